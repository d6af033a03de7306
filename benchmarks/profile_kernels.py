"""Where the device time of ddpmctl's training step and of one sampling step goes, by kernel family.

    .venv/bin/python benchmarks/profile_kernels.py               # GPU: CIFAR-10 UNet, 32 px, bf16, batch 128 / 256
    .venv/bin/python benchmarks/profile_kernels.py --quick       # CPU: compare.py's small UNet at 16 px

Both steps run eagerly (no CUDA graph, so the profiler sees each kernel): the training step of
compare.py (TrainStep + AdamW + EMA) and one network evaluation of DDIM sampling. For each, it prints
the share of device time per family (convolution, matmul, normalisation, attention, element-wise,
copies, optimizer) and the top aten ops by the device time of the kernels they launched, so a speed
change starts from where the time is.
The last line is one JSON object with the family shares.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402  (benchmarks/compare.py: configs, the training step)

from ddpmctl.runtime import configure_backends, prepare_for_sampling, resolve_precision, select_device  # noqa: E402

# First match wins. Rows are aten ops (the op that launched the kernels, on CUDA too); raw kernel names
# are the fallback when the profiler attributes no device time to ops.
FAMILIES = [
    ("optimizer", r"adam|foreach|lerp|multi_tensor|_amp_|norm_kernel.*vector|linalg_vector_norm"),
    ("attention", r"flash|fmha|attention|efficient_attention|softmax"),
    ("convolution", r"conv|cudnn|implicit_gemm|winograd|dgrad|wgrad|fprop"),
    ("matmul", r"gemm|cutlass|nvjet|\bmm\b|addmm|bmm|matmul|linear|ampere_|sm\d+_xmma"),
    ("normalisation", r"group_norm|groupnorm|native_group|layer_norm|welford|batch_norm|moments|gammabeta|"
                      r"computeinternal"),
    ("copies", r"copy|cat|transpose|permute|contiguous|fill|memset|memcpy|to_copy|clone"),
    ("element-wise", r"elementwise|vectorized|silu|add|mul|sub|div|where|unrolled|reduce|sum|mean|pow|exp|sin|cos"),
]


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, pat in FAMILIES if re.search(pat, low)), "other")


def profile_fn(fn: Callable[[], object], device: torch.device, reps: int) -> list[tuple[str, float]]:
    """(name, self device microseconds per call) of each kernel (CUDA) or leaf op (CPU), summed over reps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        compare.sync(device)
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    if device.type == "cuda":
        out = [(e.key, e.self_device_time_total) for e in ops if e.self_device_time_total > 0]
        if not out:  # no device time attributed to ops: the kernels themselves
            out = [(e.key, e.self_device_time_total) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        out = [(e.key, e.self_cpu_time_total) for e in ops if e.self_cpu_time_total > 0]
    return sorted(((k, us / reps) for k, us in out), key=lambda kv: -kv[1])


def report(title: str, rows: list[tuple[str, float]], top: int) -> dict[str, float]:
    total = sum(us for _, us in rows) or 1.0
    fams: dict[str, float] = defaultdict(float)
    for name, us in rows:
        fams[family(name)] += us
    print(f"\n## {title}: {total / 1e3:.2f} ms of device time per step")
    for fam, us in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<14} {100 * us / total:5.1f}%  {us / 1e3:8.3f} ms")
    print(f"  top {top}:")
    for name, us in rows[:top]:
        print(f"    {100 * us / total:5.1f}%  {us / 1e3:7.3f} ms  [{family(name)}] {name[:110]}")
    return {fam: round(us / total, 4) for fam, us in fams.items()} | {"ms": round(total / 1e3, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="compare.py's small CPU UNet at 16 px")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, help="training batch (default 128; 64 with --quick)")
    p.add_argument("--sample-batch", type=int, help="sampling batch (default 256; 16 with --quick)")
    p.add_argument("--channels-last", action="store_true", help="profile the channels_last layout")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)

    device = select_device(args.device)
    configure_backends(device)
    precision = resolve_precision(args.precision, device)
    cfg, _ = compare.quick_configs() if args.quick else compare.cifar10_configs()
    batch_n = args.batch or (64 if args.quick else 128)
    sample_n = args.sample_batch or (16 if args.quick else 256)
    print(f"# {compare.describe_machine(device)} | torch {torch.__version__} | {precision.name} | "
          f"{cfg.img_size} px | {'channels_last' if args.channels_last else 'NCHW'} | eager, no CUDA graph")
    res: dict = {"device": compare.describe_machine(device), "precision": precision.name}

    opts = compare.ours_options("nograph+cl" if args.channels_last else "nograph+nchw", device)
    batch = torch.randint(0, 256, (batch_n, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    step = compare.ddpmctl_train_step(compare.build_ours(cfg, device, args.channels_last), device, precision, batch,
                                      False, opts)
    for _ in range(3):
        step()
    res["train"] = report(f"training step, batch {batch_n}", profile_fn(step, device, args.reps), args.top)
    del step

    model = compare.build_ours(cfg, device, args.channels_last).eval().requires_grad_(False)
    model = prepare_for_sampling(model, device)
    x = torch.randn(sample_n, 3, cfg.img_size, cfg.img_size, device=device)
    t = torch.full((sample_n,), 500, device=device, dtype=torch.long)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with precision.autocast():
            return model(x, t)

    for _ in range(3):
        forward()
    res["sample_forward"] = report(f"one sampling network evaluation, batch {sample_n}",
                                   profile_fn(forward, device, args.reps), args.top)
    print()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
