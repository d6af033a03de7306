"""Peak memory and step time of the training step with and without --gradient-checkpointing.

    .venv/bin/python benchmarks/checkpointing_memory.py [--config configs/celeba_128_m3_ultra.yaml]
        [--batch-size 4] [--rounds 2] [--threads N] [--device cpu|cuda] [--precision fp32] [--malloc-defaults]

The model is the config's (default: the 128 px / 96 channel model of configs/celeba_128_m3_ultra.yaml), trained
by the real step (parts.build_parts, as `ddpmctl train` and `doctor` run it) on random images. Memory: each
variant trains two steps in a fresh child process. Time: a third child alternates the two (checkpointing is a
switch on the model) for ``--rounds`` rounds after one untimed step and keeps each one's fastest step, so load
from other work on the machine falls on both alike (on a busy machine, ``--threads 1`` keeps OpenMP threads
from spinning against the other work, which slowed steps tenfold on 2 shared cores).

Training memory is what the step needs on top of the process before the model was built (torch loaded): the
weights, their EMA copy, the gradients, AdamW's state and the activations kept for backward. On CUDA that is
torch.cuda.max_memory_allocated; on the CPU, the peak RSS (VmHWM) minus the RSS before the model was built,
with glibc's mmap threshold pinned at 128 KiB (MALLOC_MMAP_THRESHOLD_) so that a freed tensor leaves the RSS
and the peak follows the live tensors (``--malloc-defaults`` keeps glibc's own, which holds freed memory back);
the timing child keeps glibc's defaults, as an mmap per tensor would slow every step.
The process's whole peak RSS (torch's libraries included) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpmctl import config as config_mod
from ddpmctl.host import cpu_cores, peak_rss, reset_peak_rss, status_bytes
from ddpmctl.parts import build_parts
from ddpmctl.runtime import resolve_precision

ROOT = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "131072"  # bytes: glibc's default start, without its dynamic raise to 32 MiB after frees


def child(args: argparse.Namespace) -> dict[str, float]:
    """One variant's memory ("on", "off") or both variants' step times ("timing"), in this process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_mod.resolve(args.config, {"batch_size": args.batch_size, "device": args.device,
                                           "gradient_checkpointing": args.variant == "on", "precision": args.precision})
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else status_bytes("VmRSS") or 0
    if not cuda and not reset_peak_rss():
        print("note: the peak RSS cannot be reset here; it includes the imports", file=sys.stderr)
    parts = build_parts(cfg, device, resolve_precision(cfg.training.precision, device))
    size = cfg.model.img_size
    batch = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(checkpointing: bool) -> tuple[float, float]:
        parts.model.gradient_checkpointing = checkpointing  # as the doctor's probe switches it
        sync()
        started = time.perf_counter()
        loss = parts.step.step([batch]).loss.item()
        return time.perf_counter() - started, loss

    torch.manual_seed(0)
    if args.variant == "timing":
        step(False)  # first-call costs (thread pools, allocator)
        times = [[step(on)[0] for on in (False, True)] for _ in range(args.rounds)]
        return {"off_seconds": min(t[0] for t in times), "on_seconds": min(t[1] for t in times)}
    losses = [step(args.variant == "on")[1] for _ in range(2)]
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return {"training_bytes": peak - before, "peak_bytes": peak, "loss": losses[-1],
            "parameters": sum(p.numel() for p in parts.model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "celeba_128_m3_ultra.yaml"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--malloc-defaults", action="store_true", help="keep glibc's own mmap threshold (CPU)")
    parser.add_argument("--variant", choices=["on", "off", "timing"], help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ)
    if args.device == "cpu" and not args.malloc_defaults:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    results = {}
    timing_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # mmap per tensor costs time
    for variant in ("off", "on", "timing"):
        cmd = [sys.executable, __file__, "--variant", variant, "--config", args.config, "--batch-size",
               str(args.batch_size), "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", args.device,
               "--precision", args.precision]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=timing_env if variant == "timing" else env)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on, timing = results["off"], results["on"], results["timing"]
    off["seconds_per_step"], on["seconds_per_step"] = timing["off_seconds"], timing["on_seconds"]
    malloc = "" if args.device == "cuda" else (", glibc defaults" if args.malloc_defaults else
                                               f", MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    print(f"{Path(args.config).name}: {off['parameters'] / 1e6:.1f}M parameters, batch {args.batch_size}, "
          f"{args.precision}, {args.device} ({platform.machine()}, {cpu_cores()} cores, "
          f"{args.threads or torch.get_num_threads()} threads, torch {torch.__version__}{malloc})")
    whole = "max_memory_allocated" if args.device == "cuda" else "process peak RSS"
    for name, r in (("without checkpointing", off), ("with checkpointing", on)):
        print(f"  {name:<22} training memory {r['training_bytes'] / 2**20:7,.0f} MiB ({whole} "
              f"{r['peak_bytes'] / 2**20:,.0f} MiB), {r['seconds_per_step']:.2f} s/step (fastest of {args.rounds}), "
              f"loss {r['loss']:.4f}")
    print(f"  checkpointing: training memory {1 - on['training_bytes'] / off['training_bytes']:.0%} lower ({whole} "
          f"{1 - on['peak_bytes'] / off['peak_bytes']:.0%} lower), {on['seconds_per_step'] / off['seconds_per_step']:.2f}x "
          "the time per step")


if __name__ == "__main__":
    main()
