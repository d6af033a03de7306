"""Sampling speed (images/s) of DDPM-1000 and DDIM-50 at 32 px, for the demo and the CIFAR-10 model configs.

    .venv/bin/python benchmarks/sampling_speed.py                # CPU, timed steps extrapolated to full chains
    .venv/bin/python benchmarks/sampling_speed.py --device cuda --batch 256 --cifar-batch 256 --full

Each sampler step is one network evaluation plus a few element-wise operations, so a chain of S steps
costs S times one step. By default each row times ``--timed-steps`` steps of the real sampling loop
(after one warm-up step) and reports images/s = batch / (seconds per step x S); ``--full`` runs whole
chains instead. Random weights: speed does not depend on training. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpmctl.config import load_yaml  # noqa: E402
from ddpmctl.diffusion import Schedule  # noqa: E402
from ddpmctl.runtime import build_model, resolve_precision, select_device  # noqa: E402
from ddpmctl.sampling import sample, sampler_timesteps  # noqa: E402


class _Enough(Exception):
    pass


def time_sampler(model, sched, device, precision, batch: int, sampler: str, steps: int | None,
                 timed_steps: int, full: bool) -> dict:
    """Seconds per step and images/s of one sampler on one batch."""
    chain = len(sampler_timesteps(sched.num_steps, sampler, steps))
    noise = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    marks: list[float] = []
    wanted = chain if full else min(chain, timed_steps + 1)

    def tick(i: int, _n: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if i >= wanted:
            raise _Enough

    try:
        sample(model, sched, noise, sampler=sampler, steps=steps, generator=gen,
               autocast=precision.autocast, callback=tick)
    except _Enough:
        pass
    per_step = (marks[-1] - marks[0]) / max(1, len(marks) - 1)  # the first step is the warm-up
    return {"sampler": f"{sampler.upper()}-{chain}", "batch": batch, "seconds_per_step": per_step,
            "chain_seconds": per_step * chain, "images_per_sec": batch / (per_step * chain),
            "timed_steps": len(marks) - 1, "extrapolated": not full and wanted < chain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16")
    ap.add_argument("--batch", type=int, default=16, help="batch for the demo model")
    ap.add_argument("--cifar-batch", type=int, default=4, help="batch for the CIFAR-10 model")
    ap.add_argument("--timed-steps", type=int, default=10, help="steps timed per row (after one warm-up step)")
    ap.add_argument("--full", action="store_true", help="run whole chains instead of extrapolating")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = []
    for name, cfg_file, batch in (("demo", "configs/demo_cpu.yaml", args.batch),
                                  ("cifar10", "configs/cifar10_ddpm.yaml", args.cifar_batch)):
        cfg = load_yaml(ROOT / cfg_file)
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval().requires_grad_(False)
        params = sum(p.numel() for p in model.parameters())
        sched = Schedule(cfg.diffusion, device)
        for sampler, steps in (("ddpm", None), ("ddim", 50)):
            with torch.no_grad():
                r = time_sampler(model, sched, device, precision, batch, sampler, steps, args.timed_steps, args.full)
            rows.append({"model": name, "params_m": round(params / 1e6, 2), **r})
            print(f"  {name:8s} {r['sampler']:10s} batch {batch:4d}: {r['images_per_sec']:9.3f} img/s "
                  f"({r['seconds_per_step'] * 1e3:.1f} ms/step)", file=sys.stderr, flush=True)
    machine = f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    print(f"\nSampling speed at 32 px on {device.type} ({machine}), {precision.name}, torch {torch.__version__}")
    print(f"{'model':10s} {'params':>8s} {'sampler':>10s} {'batch':>6s} {'ms/step':>9s} {'chain s':>9s} {'img/s':>9s}")
    for r in rows:
        print(f"{r['model']:10s} {r['params_m']:7.2f}M {r['sampler']:>10s} {r['batch']:6d} "
              f"{r['seconds_per_step'] * 1e3:9.1f} {r['chain_seconds']:9.1f} {r['images_per_sec']:9.3f}"
              + ("  (extrapolated)" if r["extrapolated"] else ""))
    print(json.dumps({"benchmark": "sampling_speed", "device": device.type, "machine": machine,
                      "precision": precision.name, "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
