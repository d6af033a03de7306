"""Does the memorization report tell a model that copies from one that does not? Two runs of the demo recipe.

    nice .venv/bin/python benchmarks/memorization_check.py [--work runs/memorization_check] [--steps 1500]

Trains a small version of the demo recipe (configs/demo_cpu.yaml at 16 px, channels 32-64, batch 8)
twice on the CPU, with the same steps: once on 8 demo images (it can only learn those: it should copy
them) and once on the demo data (4,000 images: it should not). Then samples --num images from each
(DDIM-50, EMA weights) and prints the memorization report of each against its own training images, as
`ddpmctl evaluate --memorization` would, and writes each run's nearest.png. About five minutes per run
on 2 CPU cores; runs already trained are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl.config import resolve  # noqa: E402
from ddpmctl.demo_data import make_demo_dataset  # noqa: E402
from ddpmctl.engine import train  # noqa: E402
from ddpmctl.inference import iter_samples, load_model  # noqa: E402
from ddpmctl.memorization import MemorizationCheck  # noqa: E402
from ddpmctl.memorization_io import load_reference, write_report  # noqa: E402
from ddpmctl.sampling import to_uint8  # noqa: E402

SMALL = {"img_size": 16, "channel_multipliers": "1,2", "batch_size": 8}  # the demo recipe, cut to CPU minutes


def run(name: str, data: Path, work: Path, steps: int) -> Path:
    """Train the demo recipe on ``data`` (or reuse a finished run); returns the run folder."""
    cfg = resolve(ROOT / "configs" / "demo_cpu.yaml", {
        "experiment_name": name, "path_to_data": str(data), "working_directory": str(work / "working"),
        "generated_directory": str(work / "generated"), "num_training_steps": steps, "evaluation_interval": steps,
        **SMALL,
    })
    if not (cfg.run_dir / f"checkpoint_{steps}").is_dir():
        started = time.perf_counter()
        train(cfg)
        print(f"{name}: trained {steps} steps on {data} in {time.perf_counter() - started:.0f} s", flush=True)
    return cfg.run_dir


def report(name: str, run_dir: Path, data: Path, num: int, out: Path) -> dict:
    loaded = load_model(run_dir, device="cpu")
    ref, _ = load_reference(data, loaded.config.model.img_size, cache_dir=out / "cache", num_workers=0)
    check = MemorizationCheck(ref)
    for batch in iter_samples(loaded, num, "ddim", 50, seed=0, batch_size=64):
        check.add(to_uint8(batch.images))
    result = check.result()
    write_report(result, out / name)
    px, ft = result.pixel, result.features
    print(f"\n{name}: {result.num_samples} samples against its {result.num_training} training images "
          f"(step {loaded.step})")
    print(f"  likely copies   {100 * result.copy_share:5.1f}%   (training images among themselves: "
          f"{100 * result.real_share:.1f}%)   copying: {result.copying}")
    print(f"  pixels          nearest RMS {px.median:5.1f} (training images: {px.real_median:5.1f}, "
          f"{px.median / px.real_median:.2f}x)   under threshold {100 * px.share:5.1f}%   ratio test "
          f"{100 * px.ratio_share:5.1f}% (training images {100 * px.real_ratio_share:.1f}%)")
    print(f"  features        nearest {ft.median:.3f} (training images: {ft.real_median:.3f}, "
          f"{ft.median / ft.real_median:.2f}x)   under threshold {100 * ft.share:5.1f}%   ratio test "
          f"{100 * ft.ratio_share:5.1f}% (training images {100 * ft.real_ratio_share:.1f}%)")
    print(f"  line: {result.line()}")
    print(f"  nearest.png: {result.nearest_png}", flush=True)
    return {"run": name, "step": loaded.step, **result.metrics(), "copying": result.copying}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "memorization_check", help="runs, data, reports")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of each run")
    ap.add_argument("--num", type=int, default=256, help="samples to compare with the training images")
    ap.add_argument("--demo-images", type=int, default=4000, help="training images of the healthy run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a shared 2-core machine two spin "
                                                           "against each other: tests/conftest.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    demo = make_demo_dataset(args.work / "data" / "demo", num_images=args.demo_images, size=SMALL["img_size"], seed=0)
    eight = args.work / "data" / "eight"
    eight.mkdir(parents=True, exist_ok=True)
    for p in sorted(demo.glob("*.png"))[:8]:
        if not (eight / p.name).is_file():
            (eight / p.name).write_bytes(p.read_bytes())
    rows = []
    for name, data in (("overfit_8_images", eight), ("healthy_demo", demo)):
        run_dir = run(name, data, args.work, args.steps)
        rows.append(report(name, run_dir, data, args.num, args.work / "reports"))
    print(json.dumps({"benchmark": "memorization_check", "steps": args.steps, "num": args.num, "runs": rows}))


if __name__ == "__main__":
    main()
