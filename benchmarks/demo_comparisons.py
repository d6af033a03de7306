"""Before/after grids for the README from a trained demo run: EMA vs raw weights, DDPM-1000 vs DDIM-50.

    .venv/bin/python benchmarks/demo_comparisons.py runs/working/demo [--out docs/images] [--num 36]

Writes four grids (the same seed, so the same x_T in each tile position):
    demo_ema_ddpm1000.png   demo_noema_ddpm1000.png   demo_ema_ddim50.png   demo_noema_ddim50.png
and prints the sampling time of each and one JSON line. RUN is a run folder (its latest checkpoint) or
a checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl.inference import iter_samples, load_model  # noqa: E402
from ddpmctl.sampling import save_png, tile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the demo run folder (or one of its checkpoints)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the grids go")
    ap.add_argument("--num", type=int, default=36, help="images per grid (a square number looks best)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", help="autocast for sampling (the demo trains in bf16)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for use_ema in (True, False):
        loaded = load_model(args.run, device=args.device, use_ema=use_ema, precision=args.precision)
        if use_ema and not loaded.ema:
            sys.exit(f"{loaded.checkpoint} has no EMA weights: train the demo with EMA on")
        for sampler, steps in (("ddpm", None), ("ddim", args.ddim_steps)):
            chain = loaded.schedule.num_steps if sampler == "ddpm" else steps
            started = time.perf_counter()
            images = torch.cat([b.images for b in iter_samples(loaded, args.num, sampler, steps, seed=args.seed,
                                                              batch_size=args.batch_size)])
            seconds = time.perf_counter() - started
            grid = tile(images, math.ceil(math.sqrt(args.num)))
            name = f"demo_{'ema' if use_ema else 'noema'}_{sampler}{chain}.png"
            save_png(grid, args.out / name)
            rows.append({"file": str(args.out / name), "ema": use_ema, "sampler": f"{sampler.upper()}-{chain}",
                         "images": args.num, "seconds": round(seconds, 1), "step": loaded.step})
            print(f"{name:28s} {seconds:7.1f} s  ({args.num} images, checkpoint step {loaded.step})", flush=True)
    print(json.dumps({"benchmark": "demo_comparisons", "run": str(args.run), "device": args.device,
                      "precision": loaded.precision.name,
                      "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "rows": rows}))


if __name__ == "__main__":
    main()
