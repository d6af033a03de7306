"""How close ``train --dry-run``'s time estimate comes to real training: the dry run, then the first real steps.

Runs ``ddpmctl train --dry-run`` (timed from the outside, as a user waits for it) and, right after it, the same
configuration for ``--steps`` real optimizer steps (stopped there, before any grid), and prints the estimated
and the measured seconds per step, their ratio and the load average before, between and after (the two runs
share the machine with whatever else runs on it). Nothing is downloaded; the data is a folder of pictures:

    python -c "from ddpmctl.demo_data import make_demo_dataset; make_demo_dataset('/tmp/demo32', 500, 32)"
    python benchmarks/dry_run_accuracy.py --config configs/celeba_128_m3_ultra.yaml --data /tmp/demo32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmctl.config import resolve  # noqa: E402
from ddpmctl.engine import StepStats, StopFlag, train  # noqa: E402
from ddpmctl.errors import TrainingStopped  # noqa: E402
from ddpmctl.host import cpu_cores, peak_rss  # noqa: E402


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def dry_run(args: argparse.Namespace, work: Path) -> tuple[float, float, str]:
    """(estimated seconds per step, wall seconds of the whole command, its output)."""
    cmd = [sys.executable, "-m", "ddpmctl", "train", "--config", args.config, "--path-to-data", args.data,
           "--working-directory", str(work / "w"), "--generated-directory", str(work / "g"), "--device", args.device,
           "--dry-run"]
    started = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"the dry run failed:\n{run.stdout}\n{run.stderr}")
    found = re.search(r"time: ([0-9.e+]+) s per step", run.stdout)
    if not found:
        sys.exit(f"no time estimate in the dry run's output:\n{run.stdout}")
    return float(found.group(1)), wall, run.stdout


def real_steps(args: argparse.Namespace, work: Path) -> list[float]:
    """Seconds from the loop's start to the end of each of the first ``args.steps`` steps (the first one included)."""
    cfg = resolve(args.config, {"path_to_data": args.data, "working_directory": str(work / "w"),
                                "generated_directory": str(work / "g"), "device": args.device, "log_interval": 1})
    stop, ends = StopFlag(), []

    def on_event(event: object) -> None:
        if isinstance(event, StepStats) and event.logged:
            ends.append(event.elapsed)
            if event.step >= args.steps:
                stop.request("benchmark")  # stops here with a checkpoint (not timed), before any grid

    try:
        train(cfg, on_event, stop)
    except TrainingStopped:
        pass
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/celeba_128_m3_ultra.yaml")
    parser.add_argument("--data", required=True, help="a folder of pictures (e.g. the demo's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    print(f"machine: {cpu_cores()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {load()} (1/5/15 min)")
    with tempfile.TemporaryDirectory() as tmp:
        estimate, wall, output = dry_run(args, Path(tmp))
        print("\n".join(line for line in output.splitlines() if not line.startswith("  ")))  # the config left out
        print(f"dry run: {wall:.1f} s wall, estimate {estimate:.3g} s per step; load average {load()}")
        ends = real_steps(args, Path(tmp))
    steps = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    measured = ends[-1] / len(ends)
    print(f"real: {len(ends)} steps in {ends[-1]:.1f} s, {measured:.3g} s per step (first {steps[0]:.3g} s, "
          f"median {statistics.median(steps):.3g} s, max {max(steps):.3g} s); peak RSS {peak_rss() / 2**30:.1f} GiB; "
          f"load average {load()}")
    error = estimate / measured - 1
    print(f"estimate / measured = {estimate / measured:.3f} ({error:+.1%})")
    print(json.dumps({"estimate_s_per_step": estimate, "measured_s_per_step": measured, "ratio": estimate / measured,
                      "dry_run_wall_s": wall, "steps": len(ends), "step_seconds": steps, "load_after": load()}))


if __name__ == "__main__":
    main()
