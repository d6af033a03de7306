"""What training under torchrun costs next to one process: images/s of each, forced at world size 1.

    .venv/bin/python benchmarks/ddp_overhead.py            # CUDA if present (NCCL), else the CPU (gloo)
    .venv/bin/python benchmarks/ddp_overhead.py --quick    # tiny model: seconds on a 2-core CPU

Every variant runs ddpmctl's own training loop (``engine.Trainer``) on the same data and config:

* plain: what ``ddpmctl train`` runs in one process (no process group; the CUDA graph on CUDA);
* torchrun: what every rank of ``torchrun -m ddpmctl train`` runs, forced at world size 1: a one-process
  group (NCCL on CUDA, gloo on the CPU) and the per-step all-reduces of the skip decision and stop flag;
  on CUDA the step replays its CUDA graph and GradSync all-reduces the gradients after it, elsewhere
  the model sits inside DistributedDataParallel (gradient buckets all-reduced during backward);
* torchrun-ddp (CUDA only): the same with --no-cuda-graph, i.e. the DistributedDataParallel path.

So the differences are the fixed costs per step; with N > 1 GPUs the all-reduce of the gradients over
the interconnect comes on top. Images/s is read from the engine's own progress reports; the first
report (first-step set-up, capture, cuDNN autotuning) is dropped. The variants alternate over --rounds
rounds, so a busy machine slows all alike, and each figure is the median.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl.config import resolve  # noqa: E402
from ddpmctl.engine import StepStats, StopFlag, Trainer  # noqa: E402
from ddpmctl.runtime import HOST_WAIT_TIMEOUT, DistInfo  # noqa: E402


class OneRankDDP(DistInfo):
    """Rank 0 of a world of one, taking every distributed code path of the engine."""

    @property
    def enabled(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packed_data(root: Path, count: int, size: int) -> Path:
    """A packed uint8 array (memory-mapped by the engine: no decoding, so the loader is never the limit)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(count, 3, size, size), dtype=np.uint8)
    path = root / "data.npy"
    np.save(path, array)
    return path


def overrides(args: argparse.Namespace, data: Path, work: Path, name: str) -> dict:
    steps = args.log_interval * (args.windows + 1)
    return {"cuda_graph": not name.startswith("torchrun-ddp"),
        "path_to_data": str(data), "working_directory": str(work), "generated_directory": str(work / "gen"),
        "experiment_name": name, "device": args.device, "img_size": args.img_size,
        "starting_channels": args.channels, "channel_multipliers": args.multipliers,
        "num_res_blocks": args.res_blocks, "attention_resolutions": args.attention, "batch_size": args.batch_size,
        "num_training_steps": steps, "warmup_steps": 1, "evaluation_interval": steps, "log_interval": args.log_interval,
        "num_workers": args.workers, "precision": args.precision, "compile": args.compile,
        "num_generations": 1, "sampler": "ddim", "sampling_steps": 2, "num_diffusion_timesteps": 1000,
    }


def run_once(args: argparse.Namespace, data: Path, work: Path, name: str, info: DistInfo) -> float:
    """Median images/s over the engine's progress reports after the first."""
    cfg = resolve(None, overrides(args, data, work, name))
    speeds: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, StepStats):
            speeds.append(event.images_per_sec)

    Trainer(cfg, info, on_event, StopFlag()).run()
    return statistics.median(speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (CPU smoke run)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--multipliers", default="1,2,2,2")
    parser.add_argument("--res-blocks", type=int, default=2)
    parser.add_argument("--attention", default="16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--log-interval", type=int, default=25, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per run (after one warm-up window)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if args.quick or not use_cuda:
        if args.quick or args.img_size == 32 and args.channels == 128:  # the GPU defaults are far too big here
            args.img_size, args.channels, args.multipliers, args.res_blocks = 16, 16, "1,2", 1
            args.attention, args.batch_size, args.workers, args.log_interval = "8", 16, 0, 5
            args.windows, args.rounds = 2, 2

    torch.manual_seed(0)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=10))
    info_ddp = OneRankDDP(0, 0, 1, dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT))
    device_name = torch.cuda.get_device_name(0) if use_cuda else f"{platform.processor() or platform.machine()} CPU"
    variants = ["plain", "torchrun", "torchrun-ddp"] if use_cuda else ["plain", "torchrun"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = packed_data(root, max(512, args.batch_size * 4), args.img_size)
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                info = DistInfo() if variant == "plain" else info_ddp
                speed = run_once(args, data, root / "work", f"{variant}_{r}", info)
                results[variant].append(speed)
                print(f"round {r + 1}/{args.rounds} {variant:12s} {speed:10.1f} img/s", flush=True)
    dist.destroy_process_group()

    medians = {v: statistics.median(results[v]) for v in variants}
    print(f"\ndevice: {device_name} ({backend}), torch {torch.__version__}")
    print(f"model: {args.img_size}px, C={args.channels}, mult {args.multipliers}, {args.res_blocks} res blocks, "
          f"attention at {args.attention or 'none'}, batch {args.batch_size}, precision {args.precision}, "
          f"compile {args.compile}")
    labels = {"plain": "one process", "torchrun": "torchrun path, world size 1",
              "torchrun-ddp": "torchrun, DDP wrapper (no graph)"}
    print(f"{'variant':<36}{'img/s (median)':>16}{'vs one process':>16}")
    for v in variants:
        print(f"{labels[v]:<36}{medians[v]:>16.1f}{100.0 * (medians[v] / medians['plain'] - 1):>+15.1f}%")
    print(json.dumps({
        "benchmark": "ddp_overhead", "device": device_name, "backend": backend, "torch": torch.__version__,
        "img_size": args.img_size, "channels": args.channels, "multipliers": args.multipliers,
        "batch_size": args.batch_size, "precision": args.precision, "compile": args.compile,
        **{f"{v.replace('-', '_')}_img_s": results[v] for v in variants},
        **{f"{v.replace('-', '_')}_median": medians[v] for v in variants},
        "overhead_percent": 100.0 * (medians["plain"] - medians["torchrun"]) / medians["plain"],
    }))


if __name__ == "__main__":
    main()
