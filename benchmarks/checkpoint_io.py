"""What a checkpoint costs: size on disk, time to save (fsync + SHA-256), to verify on resume, to load.

    .venv/bin/python benchmarks/checkpoint_io.py [--config configs/cifar10_ddpm.yaml] [--dir /tmp] [--repeat 3]

Builds the config's UNet with EMA and a filled AdamW state (as after a training step), then times
``checkpoints.save_checkpoint`` (what training pays at each evaluation interval), the checksum pass
``resolve_checkpoint`` makes before a resume, and reading everything back. Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddpmctl import checkpoints, rundir
from ddpmctl.config import Config, load_yaml, to_dict
from ddpmctl.runtime import build_model


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__}"


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar10_ddpm.yaml")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cfg: Config = load_yaml(args.config)
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = build_model(cfg)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # fills exp_avg / exp_avg_sq, as in a real checkpoint
    params = sum(p.numel() for p in model.parameters())
    state = {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 1}, "scaler": {},
             "rng_per_rank": [{"torch": torch.get_rng_state()}], "ema_updates": 1, "skipped_steps": 0}
    meta = {"config": to_dict(cfg), "data_state": {"world_size": 1, "ranks": [{"epoch": 0, "position": 0}]},
            "loss": 0.1, "ema": True}

    root = Path(tempfile.mkdtemp(prefix="ddpmctl-ckpt-bench-", dir=args.dir))
    try:
        step = iter(range(1, 10**6))
        save_s, path = timed(lambda: checkpoints.save_checkpoint(
            root, next(step), model.state_dict(), state, meta, ema_state=ema.state_dict()), args.repeat)
        size = checkpoints.inspect_checkpoint(path).size_bytes
        list_s, _ = timed(lambda: rundir.list_checkpoints(root), args.repeat)
        verify_s, _ = timed(lambda: rundir.resolve_checkpoint(root, path.name), args.repeat)
        load_s, _ = timed(lambda: (checkpoints.load_weights(path), checkpoints.load_weights(path, checkpoints.EMA),
                                   checkpoints.load_training_state(path)), args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"machine: {machine()}")
    print(f"config: {args.config}: {params / 1e6:.1f}M parameters; files in {root.parent}")
    print(f"checkpoint size: {size / 2**20:.0f} MiB (model + EMA + AdamW state + meta.json)")
    print(f"save (write, fsync, SHA-256, rename): {save_s:.2f} s  ({size / 2**20 / save_s:.0f} MiB/s)")
    print(f"list (meta.json + file sizes): {list_s * 1e3:.1f} ms for {args.repeat} checkpoints")
    print(f"verify before resume (SHA-256 of every file): {verify_s:.2f} s")
    print(f"load (model, EMA, training state): {load_s:.2f} s")


if __name__ == "__main__":
    main()
