"""Data throughput: `prepare` images/s, and training-loader images/s for a raw, a prepared and a packed folder.

    .venv/bin/python benchmarks/data_throughput.py [--num 300] [--size 128] [--batch 32] [--workers 2]

Generates --num 1024x768 JPEGs in a temporary folder, prepares them to --size px with --workers
processes, then pulls batches through the loader training uses (`BatchStream`: DataLoader with
--workers worker processes) for each way of reading the data. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddpmctl.data import BatchStream, build_dataset
from ddpmctl.prepare import prepare


def make_photos(dst: Path, num: int, seed: int = 0) -> None:
    """Photo-like 1024x768 JPEGs: smooth colour fields, shapes and sensor-like noise (not pure noise)."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low, "RGB").resize((1024, 768), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 1024), rng.integers(0, 768)
            r = int(rng.integers(30, 200))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=fill)
        grain = rng.integers(-6, 7, (768, 1024, 3), dtype=np.int16)
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + grain, 0, 255).astype(np.uint8), "RGB")
        im.save(dst / f"photo_{i:04d}.jpg", quality=90)


def loader_rate(path: Path, size: int, batch: int, workers: int, min_images: int, min_seconds: float,
                clock=time.perf_counter) -> float:
    """Images per second of ``clock`` pulled through BatchStream, after two warm-up batches."""
    dataset, _ = build_dataset(path, size)
    stream = BatchStream(dataset, batch, workers, pin_memory=False, seed=0)
    try:
        for _ in range(2):
            b = next(stream)
        assert b.dtype == torch.uint8 and tuple(b.shape[1:]) == (3, size, size)
        n, t0 = 0, clock()
        while n < min_images or clock() - t0 < min_seconds:
            n += next(stream).shape[0]
        return n / (clock() - t0)
    finally:
        stream.close()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=300, help="generated 1024x768 JPEGs")
    ap.add_argument("--size", type=int, default=128, help="training resolution")
    ap.add_argument("--batch", type=int, default=32, help="batch size")
    ap.add_argument("--workers", type=int, default=2, help="prepare processes and DataLoader workers")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per loader")
    args = ap.parse_args()
    torch.set_num_threads(1)  # this process only collates; idle OpenMP threads spinning would count as decode CPU
    load = os.getloadavg()[0]
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores"

    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        make_photos(raw, args.num)

        t0, c0 = time.perf_counter(), cpu_seconds()
        result = prepare(raw, prepared, args.size, workers=args.workers, pack=False)
        prep_rate = result.converted / (time.perf_counter() - t0)
        prep_cpu = result.converted / (cpu_seconds() - c0)
        t0 = time.perf_counter()
        prepare(raw, prepared, args.size, workers=args.workers, pack=True)  # unchanged sources: packing only
        pack_s = time.perf_counter() - t0
        packed_file = prepared / "packed.npy"
        packed_copy = Path(tmp) / "packed_only.npy"  # the prepared folder would pick its pack; keep a PNG-only view
        os.replace(packed_file, packed_copy)

        # Wall-clock images/s with --workers DataLoader workers (what training gets), and images per
        # CPU-second decoding in this process: the second is what a busy machine cannot distort much.
        rows: dict[str, tuple[float, float]] = {}
        for key, path in (("raw", raw), ("prepared_png", prepared), ("packed", packed_copy)):
            min_images = args.num if key == "raw" else 20 * args.num
            wall = loader_rate(path, args.size, args.batch, args.workers, min_images, args.seconds)
            cpu = loader_rate(path, args.size, args.batch, 0, min_images, args.seconds / 2, clock=time.process_time)
            rows[key] = (wall, cpu)

    names = {"raw": "raw folder (on-the-fly resize)", "prepared_png": "prepared PNG folder",
             "packed": "packed array (memmap)"}
    print(f"machine: {machine}; load average before the run {load:.1f}; {args.num} generated 1024x768 JPEGs")
    print(f"prepare to {args.size}px, {args.workers} processes: {prep_rate:,.0f} images/s "
          f"({prep_cpu:,.0f} per CPU-second); pack: {pack_s:.2f} s")
    print(f"loader: BatchStream, batch {args.batch}, {args.size}px; wall-clock with {args.workers} workers "
          "(a packed array is read in-process), and per CPU-second of decoding")
    print(f"{'source':<34}{'images/s':>12}{'per CPU-s':>12}{'vs raw':>9}")
    raw_rate = rows["raw"][0]
    for key, (wall, cpu) in rows.items():
        print(f"{names[key]:<34}{wall:>12,.0f}{cpu:>12,.0f}{wall / raw_rate:>8.1f}x")
    print(json.dumps({
        "machine": machine, "load_average": round(load, 2), "num_images": args.num, "size": args.size,
        "batch": args.batch, "workers": args.workers, "prepare_img_s": round(prep_rate, 1),
        "prepare_img_per_cpu_s": round(prep_cpu, 1), "pack_s": round(pack_s, 3),
        "loader_img_s": {k: round(v[0], 1) for k, v in rows.items()},
        "loader_img_per_cpu_s": {k: round(v[1], 1) for k, v in rows.items()},
        "packed_vs_raw": round(rows["packed"][0] / raw_rate, 1),
    }))


if __name__ == "__main__":
    main()
