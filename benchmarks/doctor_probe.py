"""How long `ddpmctl doctor` (quick mode) takes here, and proof that its suggestion for 32 px / 32 channels trains.

    .venv/bin/python benchmarks/doctor_probe.py [--steps 3] [--skip-default]

1. Runs `ddpmctl doctor --json` (default model: 128 px, 128 channels, the 64/128/256 x 64/96/128 table) as a
   user would and prints its wall time and what it suggests.
2. Runs the doctor for 32 px / 32 channels, then trains a few real optimizer steps with `ddpmctl.train` at the
   suggested --batch-size / --gradient-accumulation-steps on demo images, and prints the loss and speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpmctl import config as config_mod
from ddpmctl.demo_data import make_demo_dataset
from ddpmctl.doctor import run_doctor
from ddpmctl.engine import StepStats, TrainFinished, train


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def default_quick() -> None:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ddpmctl", "doctor", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        print(f"ddpmctl doctor failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
        return
    report = json.loads(out.stdout)
    probe, rec = report["probe"], report["recommendation"]
    print(f"ddpmctl doctor (quick, default 128 px / 128 channels): {wall:.1f} s wall "
          f"(the report says {report['seconds']:.1f} s)")
    print(f"  measured points: {[(p['phase'], p['batch']) for p in probe['points']]}")
    print(f"  largest batch with {probe['headroom']:.0%} headroom: {probe['max_batch']}, "
          f"{probe['images_per_sec'] or 0:.2f} img/s at batch {probe['images_per_sec_batch']}")
    if rec:
        print(f"  suggests: {rec['command']}")
    for cell in report["table"]:
        print(f"  {cell['img_size']:>3} px x {cell['starting_channels']:>3} ch: batch {cell['max_batch']}, "
              f"{cell['images_per_sec'] or 0:.2f} img/s ({cell['source']})")


def small_trains(steps: int) -> None:
    cfg = config_mod.resolve(None, {"img_size": 32, "starting_channels": 32, "device": "cpu"})
    report = run_doctor(cfg, img_sizes=(32,), channels=(32,))
    rec = report.recommendation
    print(f"ddpmctl doctor --img-size 32 --starting-channels 32: {report.seconds:.1f} s; largest batch "
          f"{report.probe.max_batch}; suggests --batch-size {rec.batch_size} "
          f"--gradient-accumulation-steps {rec.gradient_accumulation_steps}")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(Path(tmp) / "data", num_images=max(256, rec.batch_size * 2), size=32)
        cfg = config_mod.resolve(None, {
            "img_size": 32, "starting_channels": 32, "device": "cpu", "path_to_data": str(data),
            "working_directory": str(Path(tmp) / "work"), "generated_directory": str(Path(tmp) / "gen"),
            "batch_size": rec.batch_size, "gradient_accumulation_steps": rec.gradient_accumulation_steps,
            "num_training_steps": steps, "warmup_steps": 1, "evaluation_interval": steps, "log_interval": 1,
            "num_workers": 0, "num_generations": 1, "sampler": "ddim", "sampling_steps": 5,
        })
        events: list[object] = []
        started = time.perf_counter()
        train(cfg, events.append)
        wall = time.perf_counter() - started
    stats = [e for e in events if isinstance(e, StepStats)]
    done = next(e for e in events if isinstance(e, TrainFinished))
    print(f"  trained {done.step} steps at batch {rec.batch_size} x {rec.gradient_accumulation_steps}: "
          f"losses {[round(s.loss, 4) for s in stats]}, {done.images_per_sec:.1f} img/s, {wall:.1f} s with the checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-default", action="store_true", help="skip the default-model quick run")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if not args.skip_default:
        default_quick()
    small_trains(args.steps)


if __name__ == "__main__":
    main()
