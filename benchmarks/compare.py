"""ddpmctl against diffusers, side by side in one process, on whatever device is present (CUDA > MPS > CPU).

Both libraries get the same architecture (model FLOPs per image within 10%, counted with
``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward), the same uint8 batch, the same
precision and the same memory format, and each runs the full training step its own trainer runs:

* ddpmctl: the very step ``ddpmctl train`` runs, built by its own set-up (``parts.build_parts``; uint8 ->
  [-1, 1] and flip on the device, q_sample, autocast forward, loss, backward, clip, non-finite guard, AdamW,
  cosine LR, EMA).
* diffusers: the step of its ``train_unconditional.py`` example (``DDPMScheduler.add_noise``,
  ``UNet2DModel``, MSE, backward, clip, AdamW, cosine LR, ``EMAModel``).

Then DDIM-50 sampling (ddpmctl's ``sampling.sample`` against a ``DDIMScheduler`` loop as in
``DDIMPipeline``) and the data loader (ddpmctl's ``BatchStream`` over generated PNGs).
Timed rounds alternate between the two libraries, so a busy machine slows both alike; each figure is
the median over rounds.

    python benchmarks/compare.py --quick          # 2-core CPU: small UNet, 16 px, under 5 minutes
    python benchmarks/compare.py                  # GPU: DDPM CIFAR-10 UNet, 32 px, batch 128 bf16, eager + compile

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from ddpmctl import sampling  # noqa: E402
from ddpmctl.config import Config, DiffusionConfig, ModelConfig, TrainingConfig, load_yaml  # noqa: E402
from ddpmctl.data import BatchStream, build_dataset  # noqa: E402
from ddpmctl.demo_data import make_demo_dataset  # noqa: E402
from ddpmctl.diffusion import Schedule  # noqa: E402
from ddpmctl.host import cpu_cores, peak_rss, reset_peak_rss  # noqa: E402
from ddpmctl.model import UNet, count_parameters, set_low_precision_norms  # noqa: E402
from ddpmctl.parts import build_parts  # noqa: E402
from ddpmctl.runtime import (  # noqa: E402
    FrozenCompiled,
    Precision,
    configure_backends,
    low_precision_norms,
    prepare_for_sampling,
    resolve_precision,
    select_device,
)
from ddpmctl.sampling import SamplingGraphs  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of the GPUs we quote a share of peak for.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}

# ----------------------------------------------------------------------------- configurations


def quick_configs() -> tuple[ModelConfig, dict]:
    """Small UNet for the CPU: channels (32, 64, 64), 2 blocks per stage, attention at 8 px, 16 px images.

    attention_head_dim=None gives diffusers one head per attention layer, as ddpmctl's num_heads=1 (the
    DDPM paper's choice); diffusers' own default (head_dim 8) has the same FLOPs but runs slower.
    """
    ours = ModelConfig(img_size=16, starting_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=2,
                       attention_resolutions=(8,), num_heads=1, bottleneck_blocks=2, dropout=0.0)
    theirs = dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
    )
    return ours, theirs


def cifar10_configs() -> tuple[ModelConfig, dict]:
    """The DDPM paper's CIFAR-10 UNet (35.7M): ddpmctl's preset, and google/ddpm-cifar10-32's diffusers config."""
    ours = load_yaml(ROOT / "configs" / "cifar10_ddpm.yaml").model
    theirs = dict(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=ours.dropout,
        attention_head_dim=None,
    )
    return ours, theirs


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        reset_peak_rss()  # Linux: the process's peak RSS (VmHWM) starts again from its current RSS


def peak_mib(device: torch.device) -> float | None:
    """Peak device memory since reset_peak: allocated tensors on CUDA, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return peak_rss() / 2**20


def flops_per_image(fwd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], size: int,
                    device: torch.device) -> float:
    """FLOPs of one forward + backward per image, counted by FlopCounterMode (fp32, batch 2)."""
    b = 2
    x = torch.randn(b, 3, size, size, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    with FlopCounterMode(display=False) as counter:
        fwd(x, t).float().square().mean().backward()
    return counter.get_total_flops() / b


def unwrap_sample(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """diffusers returns an output object; its .sample is the tensor."""
    return lambda x, t: model(x, t).sample


def timed_rounds(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, alternating between them round by round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - start) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_tflops(device: torch.device, precision: Precision) -> float:
    """What one large matrix multiply reaches here, at the benchmark's precision: the practical ceiling."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = precision.dtype or torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    secs = timed_rounds({"mm": lambda: a @ b}, device, 5, 3 if device.type == "cpu" else 20)["mm"]
    return 2 * n**3 / secs / 1e12


def gpu_peak_tflops(device: torch.device, precision: Precision) -> float | None:
    if device.type != "cuda" or precision.dtype is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- training steps


OURS_TOKENS = {"graph": ("cuda_graph", True), "nograph": ("cuda_graph", False), "cl": ("channels_last", True),
               "nchw": ("channels_last", False), "lpnorm": ("low_norms", True), "fp32norm": ("low_norms", False),
               "compile": ("compile", True)}


def ours_options(spec: str, device: torch.device) -> dict:
    """ddpmctl's shipped training options on ``device``, changed by a spec such as 'nograph+fp32norm'."""
    opts = {"cuda_graph": TrainingConfig.cuda_graph, "channels_last": TrainingConfig.channels_last and device.type == "cuda",
            "low_norms": low_precision_norms(device)}
    for token in filter(None, spec.split("+")):
        if token not in OURS_TOKENS:
            raise SystemExit(f"unknown ddpmctl variant token {token!r}; choose from {', '.join(OURS_TOKENS)}")
        key, value = OURS_TOKENS[token]
        opts[key] = value
    return opts


def ddpmctl_train_step(model_cfg: ModelConfig, device: torch.device, precision: Precision, batch: torch.Tensor,
                       compile_model: bool, opts: dict) -> Callable[[], torch.Tensor]:
    """The training step `ddpmctl train` runs, built by the engine's own set-up (parts.build_parts), EMA on."""
    cfg = Config(model=model_cfg, training=TrainingConfig(
        batch_size=batch.shape[0], learning_rate=2e-4, weight_decay=0.0, warmup_steps=5000, num_training_steps=10**6,
        ema_decay=0.9999, compile=compile_model, channels_last=opts["channels_last"], cuda_graph=opts["cuda_graph"]))
    parts = build_parts(cfg, device, precision)
    set_low_precision_norms(parts.model, opts["low_norms"])
    parts.model.train()

    def step() -> torch.Tensor:
        return parts.step.step([batch]).loss

    step.train_step = parts.step  # type: ignore[attr-defined] - lets the caller report a failed capture
    return step


def diffusers_train_step(model: torch.nn.Module, device: torch.device, precision: Precision, batch: torch.Tensor,
                         channels_last: bool, compile_model: bool) -> Callable[[], torch.Tensor]:
    """The training step of diffusers' examples/unconditional_image_generation/train_unconditional.py."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=device.type == "cuda" or None)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5000))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    ema = EMAModel(params, decay=0.9999, use_ema_warmup=True, foreach=True)
    ema.to(device)
    net = torch.compile(model) if compile_model else model
    model.train()

    def step() -> torch.Tensor:
        clean = batch.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        flip = torch.rand(clean.shape[0], device=device) < 0.5  # the example flips on the host; same work here
        clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        if channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with precision.autocast():
            pred = net(noisy, timesteps).sample
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        return loss.detach()

    return step


# ----------------------------------------------------------------------------- sampling


def ddpmctl_sampler(model: torch.nn.Module, device: torch.device, precision: Precision, noise: torch.Tensor,
                    graphs: SamplingGraphs | None) -> Callable[[int], torch.Tensor]:
    schedule = Schedule(DiffusionConfig(), device)

    def run(steps: int) -> torch.Tensor:
        return sampling.sample(model, schedule, noise, sampler="ddim", steps=steps, eta=0.0,
                               autocast=precision.autocast, graphs=graphs).images

    return run


def diffusers_sampler(model: torch.nn.Module, device: torch.device, precision: Precision,
                      noise: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """DDIMPipeline's loop without the progress bar: unet(x, t).sample, then DDIMScheduler.step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    @torch.no_grad()
    def run(steps: int) -> torch.Tensor:
        scheduler.set_timesteps(steps)
        image = noise
        for t in scheduler.timesteps:
            with precision.autocast():
                out = model(image, t).sample
            image = scheduler.step(out.float(), t, image, eta=0.0).prev_sample
        return image.clamp(-1, 1).float().cpu()

    return run


# ----------------------------------------------------------------------------- the benchmark


def build_ours(cfg: ModelConfig, device: torch.device, channels_last: bool) -> UNet:
    torch.manual_seed(0)
    model = UNet(cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_theirs(cfg: dict, device: torch.device, channels_last: bool) -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**cfg).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def past_deadline(args, out: dict, key: str) -> bool:
    """True (and noted in the results) once --deadline has passed: the contestant is not built or timed."""
    if args.deadline is None or time.perf_counter() - args.t0 < args.deadline:
        return False
    out[f"skipped_{key}"] = f"--deadline {args.deadline:.0f} s passed before it was built"
    print(f"# skipped {key}: --deadline passed", flush=True)
    return True


def is_compiled_spec(spec: str) -> bool:
    return bool({"compile", "freeze", "autotune"} & set(spec.split("+")))


def contestants(tag: str, variants: list[str]) -> list[str]:
    """Names timed side by side for one tag: ddpmctl as shipped, diffusers, then any extra ddpmctl variants."""
    return ["ddpmctl", "diffusers", *(f"ddpmctl[{v}]" for v in variants if is_compiled_spec(v) == (tag == "compile"))]


def bench_training(args, ours_cfg, theirs_cfg, device, precision, channels_last, compile_model, out: dict) -> None:
    tag = "compile" if compile_model else "eager"
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch, 3, ours_cfg.img_size, ours_cfg.img_size), dtype=torch.uint8, generator=gen)
    if device.type == "cuda":
        batch = batch.pin_memory()
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    mem: dict[str, float | None] = {}
    for name in contestants(tag, args.ours_variants):
        if past_deadline(args, out, f"{name}_train_{tag}"):
            continue
        # Each contestant is built and warmed up (compilation, capture) alone, its peak memory read from the
        # start: a captured CUDA graph allocates its activations once, at capture, not in later replays.
        # On CUDA the figure is its own (what was allocated before it is subtracted); on the CPU it is
        # the process's peak RSS so far.
        sync(device)
        reset_peak(device)
        before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        if name == "diffusers":
            fn = diffusers_train_step(build_theirs(theirs_cfg, device, channels_last), device, precision, batch,
                                      channels_last, compile_model)
        else:
            opts = ours_options(name[len("ddpmctl["):-1] if "[" in name else "", device)
            fn = ddpmctl_train_step(ours_cfg, device, precision, batch, compile_model, opts)
        for _ in range(args.warmup):
            fn()
        sync(device)
        peak = peak_mib(device)
        mem[name] = peak - before if peak is not None else None
        steps[name] = fn
        ts = getattr(fn, "train_step", None)
        if ts is not None:
            out[f"{name}_train_graph_{tag}"] = ts.graph is not None
            if ts.graph_note:
                out[f"{name}_train_note_{tag}"] = ts.graph_note
    secs = timed_rounds(steps, device, args.rounds, args.train_reps)
    for name in steps:
        out[f"{name}_train_img_s_{tag}"] = args.batch / secs[name]
        out[f"{name}_train_peak_mib_{tag}"] = mem[name]
    del steps
    gc.collect()


SAMPLE_TOKENS = ("cl", "nchw", "graph", "nograph", "lpnorm", "fp32norm", "compile", "freeze", "autotune", "tuned")
# "tuned": the inductor settings of PyTorch's "Accelerating Generative AI III: Diffusion, Fast" recipe for
# diffusion UNets, applied while the variant compiles (inductor reads its config at compile time).
TUNED_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                  "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}


def inductor_patch(settings: dict) -> contextlib.AbstractContextManager:
    import torch._inductor.config as inductor_config

    return inductor_config.patch(settings)


def sample_tokens(spec: str) -> list[str]:
    """The tokens of a --sample-variants spec, checked (main checks every spec before anything runs)."""
    tokens = [t for t in spec.split("+") if t]
    for t in tokens:
        if t not in SAMPLE_TOKENS:
            raise SystemExit(f"unknown sampling variant token {t!r}; choose from {', '.join(SAMPLE_TOKENS)}")
    if "tuned" in tokens and not is_compiled_spec(spec):
        raise SystemExit(f"sampling variant {spec!r}: 'tuned' changes how a model compiles; add compile, freeze or autotune")
    return tokens


def ours_sampling_model(cfg: ModelConfig, device: torch.device, spec: str) -> tuple[torch.nn.Module, bool]:
    """ddpmctl's sampling network changed by a spec such as 'cl+nograph' or 'freeze': (model, use the loop graph).

    compile = as `ddpmctl sample --compile` (reduce-overhead on CUDA); freeze = inductor with the weights
    frozen in (plus its CUDA graphs on CUDA); autotune = mode="max-autotune" (Triton/cuDNN kernel search);
    tuned = TUNED_INDUCTOR while it compiles (with compile, freeze or autotune; see bench_sampling).
    """
    tokens = sample_tokens(spec)
    model = build_ours(cfg, device, "cl" in tokens).eval().requires_grad_(False)
    model = prepare_for_sampling(model, device, compile="compile" in tokens)
    if "lpnorm" in tokens or "fp32norm" in tokens:
        set_low_precision_norms(model, "lpnorm" in tokens)
    if "freeze" in tokens:  # on CUDA with the compiler's CUDA graphs, as `sample --compile`
        model = FrozenCompiled(model, **({"mode": "reduce-overhead"} if device.type == "cuda" else {}))
    elif "autotune" in tokens:
        model = torch.compile(model, mode="max-autotune")
    return model, "nograph" not in tokens


def bench_sampling(args, ours_cfg, theirs_cfg, device, precision, channels_last, compile_model, out: dict) -> None:
    """ddpmctl's sampling as `ddpmctl sample` runs it (prepare_for_sampling; whole-loop CUDA graphs on CUDA)."""
    tag = "compile" if compile_model else "eager"
    size = ours_cfg.img_size
    noise = torch.randn(args.sample_batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    runs: dict[str, Callable[[int], torch.Tensor]] = {}
    loop_graphs: dict[str, SamplingGraphs] = {}
    for name in contestants(tag, args.sample_variants):
        if past_deadline(args, out, f"{name}_sample_{tag}"):
            continue
        try:
            tuned = False
            if name == "diffusers":
                theirs = build_theirs(theirs_cfg, device, channels_last).eval().requires_grad_(False)
                if compile_model:  # diffusers compiled as ddpmctl: CUDA graphs on CUDA, weights frozen in on the CPU
                    theirs = (torch.compile(theirs, mode="reduce-overhead") if device.type == "cuda" else
                              FrozenCompiled(theirs) if device.type == "cpu" else torch.compile(theirs))
                fn = diffusers_sampler(theirs, device, precision, noise)
            else:
                spec = name[len("ddpmctl["):-1] if "[" in name else ("compile" if compile_model else "")
                model, use_graph = ours_sampling_model(ours_cfg, device, spec)
                tuned = "tuned" in sample_tokens(spec)
                graphs = SamplingGraphs() if device.type == "cuda" and use_graph else None
                if graphs is not None:
                    loop_graphs[name] = graphs
                fn = ddpmctl_sampler(model, device, precision, noise, graphs)
            with inductor_patch(TUNED_INDUCTOR) if tuned else contextlib.nullcontext():
                fn(2 if device.type == "cpu" else args.sample_steps)  # warm-up, compilation, capture (per step count)
            runs[name] = fn
        except Exception as exc:  # noqa: BLE001 - one failed contestant (e.g. a compiler error) must not lose the rest
            traceback.print_exc()
            out[f"error_{name}_sample_{tag}"] = f"{type(exc).__name__}: {exc}"[:300]
    for name, graphs in loop_graphs.items():
        if graphs.failed:
            out[f"{name}_sample_note_{tag}"] = graphs.failed
    full = {name: (lambda fn=fn: fn(args.sample_steps)) for name, fn in runs.items()}
    secs = timed_rounds(full, device, args.sample_rounds, 1)
    for name in runs:
        out[f"{name}_sample_img_s_{tag}"] = args.sample_batch / secs[name]


def bench_loader(args, img_size: int, device: torch.device, out: dict) -> None:
    """ddpmctl's BatchStream over generated PNGs: decode + resize + collate (+ pin on CUDA), images/s."""
    workers = args.loader_workers if args.loader_workers is not None else min(4, cpu_cores())
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp) / "imgs", num_images=args.loader_images, size=img_size)
        dataset, _ = build_dataset(root, img_size)
        stream = BatchStream(dataset, args.batch, workers, pin_memory=device.type == "cuda")
        try:
            next(stream)  # start the workers
            n_batches = max(2, args.loader_images // args.batch)
            start = time.perf_counter()
            images = sum(next(stream).shape[0] for _ in range(n_batches))
            out["loader_img_s"] = images / (time.perf_counter() - start)
        finally:
            stream.close()
    out["loader_workers"] = workers


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_cores()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(res: dict, variants: list[str]) -> None:
    ours_g, theirs_g = res["ddpmctl_gflops_per_img"], res["diffusers_gflops_per_img"]
    peak = res.get("peak_tflops")
    rows = [("", "ddpmctl", "diffusers", "ratio")]
    rows.append(("parameters (M)", fmt(res["ddpmctl_params"] / 1e6, ".2f"), fmt(res["diffusers_params"] / 1e6, ".2f"), ""))
    rows.append(("GFLOPs / image (fwd+bwd)", fmt(ours_g, ".3f"), fmt(theirs_g, ".3f"),
                 fmt(ours_g / theirs_g, ".2f")))
    for v in variants:
        a, b = res.get(f"ddpmctl_train_img_s_{v}"), res.get(f"diffusers_train_img_s_{v}")
        if a is None and b is None:  # --no-training
            continue
        rows.append((f"train img/s ({v}, batch {res['batch']})", fmt(a), fmt(b), fmt(a / b if a and b else None, ".2f")))
        if a and b:
            ta, tb = a * ours_g / 1e3, b * theirs_g / 1e3
            rows.append((f"  achieved TFLOP/s ({v})", fmt(ta, ".2f"), fmt(tb, ".2f"), ""))
            if peak:
                rows.append((f"  share of {peak:.0f} TFLOP/s peak", f"{100 * ta / peak:.1f}%", f"{100 * tb / peak:.1f}%", ""))
            mm = res.get("matmul_tflops")
            if mm:
                rows.append((f"  share of a large matmul ({mm:.2f} TFLOP/s)", f"{100 * ta / mm:.0f}%",
                             f"{100 * tb / mm:.0f}%", ""))
        ma, mb = res.get(f"ddpmctl_train_peak_mib_{v}"), res.get(f"diffusers_train_peak_mib_{v}")
        rows.append((f"  peak memory MiB ({res['memory_kind']})", fmt(ma), fmt(mb), ""))
        suffix = f"_train_img_s_{v}"
        for key in sorted(k for k in res if k.startswith("ddpmctl[") and k.endswith(suffix)):
            c = res[key]
            rows.append((f"  variant {key[:-len(suffix)]}", fmt(c), "", fmt(c / b if c and b else None, ".2f")))
    for v in variants:
        a, b = res.get(f"ddpmctl_sample_img_s_{v}"), res.get(f"diffusers_sample_img_s_{v}")
        rows.append((f"DDIM-{res['sample_steps']} img/s ({v}, batch {res['sample_batch']})", fmt(a, ",.1f"), fmt(b, ",.1f"),
                     fmt(a / b if a and b else None, ".2f")))
        suffix = f"_sample_img_s_{v}"
        for key in sorted(k for k in res if k.startswith("ddpmctl[") and k.endswith(suffix)):
            c = res[key]
            rows.append((f"  variant {key[:-len(suffix)]}", fmt(c, ",.1f"), "", fmt(c / b if c and b else None, ".2f")))
    if "loader_img_s" in res:
        rows.append((f"data loader img/s ({res['loader_workers']} workers)", fmt(res["loader_img_s"]), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small UNet at 16 px (CPU-sized): under 5 minutes on 2 cores")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, help="training batch (default 128; 64 with --quick)")
    p.add_argument("--sample-batch", type=int, help="DDIM batch (default 256; 32 with --quick)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--compile", choices=["auto", "yes", "no", "only"], default="auto",
                   help="torch.compile variants: auto = eager + compile on GPU, eager only on the CPU")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--no-training", action="store_true")
    p.add_argument("--no-loader", action="store_true")
    p.add_argument("--rounds", type=int, help="alternating timed rounds for training")
    p.add_argument("--loader-workers", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--ours-variants", default="",
                   help="extra ddpmctl training variants timed beside the shipped one, comma-separated specs of "
                        "+-joined tokens: graph/nograph, cl/nchw, lpnorm/fp32norm, compile (e.g. nograph,compile+nograph)")
    p.add_argument("--sample-variants", default="",
                   help="extra ddpmctl DDIM variants timed beside the shipped one, comma-separated specs of +-joined "
                        "tokens: cl/nchw, graph/nograph, lpnorm/fp32norm, compile, freeze, autotune, tuned "
                        "(e.g. cl,freeze,cl+freeze+tuned)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after start past which no further contestant is built (those built are still "
                        "timed): a time-boxed run keeps its figures")
    p.add_argument("--diffusers-head-dim", type=int, default=None,
                   help="diffusers attention_head_dim (default: one head, as ddpmctl; 8 is diffusers' own default)")
    args = p.parse_args(argv)
    args.ours_variants = [v for v in args.ours_variants.split(",") if v]
    args.sample_variants = [v for v in args.sample_variants.split(",") if v]
    for spec in args.sample_variants:
        sample_tokens(spec)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = select_device(args.device)
    configure_backends(device)
    precision = resolve_precision(args.precision, device)
    on_gpu = device.type in ("cuda", "mps")
    channels_last = device.type == "cuda"  # as the engine: on the CPU channels_last is slower for these models
    ours_cfg, theirs_cfg = quick_configs() if args.quick else cifar10_configs()
    theirs_cfg["attention_head_dim"] = args.diffusers_head_dim
    args.batch = args.batch or (64 if args.quick else 128)
    args.sample_batch = args.sample_batch or (16 if args.quick else 256)
    args.warmup = 2 if args.quick or not on_gpu else 10
    args.rounds = args.rounds or (3 if args.quick or not on_gpu else 5)
    args.train_reps = 2 if args.quick or not on_gpu else 20
    args.sample_rounds = 3
    args.loader_images = 256 if args.quick else 2048
    variants = {"auto": ["eager", "compile"] if device.type == "cuda" else ["eager"], "yes": ["eager", "compile"],
                "no": ["eager"], "only": ["compile"]}[args.compile]

    res: dict = {"device": describe_machine(device), "device_type": device.type, "precision": precision.name,
                 "torch": torch.__version__, "batch": args.batch, "sample_batch": args.sample_batch,
                 "sample_steps": args.sample_steps, "img_size": ours_cfg.img_size, "channels_last": channels_last,
                 "memory_kind": "allocated" if device.type == "cuda" else ("driver" if device.type == "mps" else "process RSS")}
    try:
        import diffusers

        res["diffusers"] = diffusers.__version__
    except ImportError:
        print("diffusers is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 1
    print(f"# {res['device']} | torch {res['torch']} | diffusers {res['diffusers']} | {precision.name} | "
          f"{'quick' if args.quick else 'full'} config, {ours_cfg.img_size} px", flush=True)
    t0 = args.t0 = time.perf_counter()

    ours, theirs = build_ours(ours_cfg, device, False), build_theirs(theirs_cfg, device, False)
    res["ddpmctl_params"], res["diffusers_params"] = count_parameters(ours), count_parameters(theirs)
    res["ddpmctl_gflops_per_img"] = flops_per_image(ours, ours_cfg.img_size, device) / 1e9
    res["diffusers_gflops_per_img"] = flops_per_image(unwrap_sample(theirs), ours_cfg.img_size, device) / 1e9
    del ours, theirs
    ratio = res["ddpmctl_gflops_per_img"] / res["diffusers_gflops_per_img"]
    res["flops_matched"] = abs(ratio - 1) <= 0.10
    if not res["flops_matched"]:
        print(f"warning: model FLOPs differ by {100 * (ratio - 1):+.1f}% (more than 10%)", file=sys.stderr)
    res["peak_tflops"] = gpu_peak_tflops(device, precision)
    res["matmul_tflops"] = matmul_tflops(device, precision)

    for v in variants:
        for name, fn in (("training", bench_training), ("sampling", bench_sampling)):
            if (name == "sampling" and args.no_sampling) or (name == "training" and args.no_training):
                continue
            try:
                fn(args, ours_cfg, theirs_cfg, device, precision, channels_last, v == "compile", res)
            except Exception as exc:  # noqa: BLE001 - one failed variant (e.g. no compiler) must not lose the rest
                traceback.print_exc()
                res[f"error_{name}_{v}"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"# {name} ({v}) done at {time.perf_counter() - t0:.0f} s; so far: {json.dumps(res, default=str)}",
                  flush=True)  # a run cut short by a timeout still leaves its figures
    if not args.no_loader:
        bench_loader(args, ours_cfg.img_size, device, res)

    best = variants[0]  # headline figures: eager, or compiled when that is all that ran
    for k in ("train", "sample"):
        for lib in ("ddpmctl", "diffusers"):
            res[f"{lib}_{k}_img_s"] = res.get(f"{lib}_{k}_img_s_{best}")
    for v in variants:
        a, b = res.get(f"ddpmctl_train_img_s_{v}"), res.get(f"diffusers_train_img_s_{v}")
        if a and b:
            res[f"ddpmctl_train_tflops_{v}"] = a * res["ddpmctl_gflops_per_img"] / 1e3
            res[f"diffusers_train_tflops_{v}"] = b * res["diffusers_gflops_per_img"] / 1e3
            if res["peak_tflops"]:
                res[f"ddpmctl_train_peak_share_{v}"] = res[f"ddpmctl_train_tflops_{v}"] / res["peak_tflops"]
                res[f"diffusers_train_peak_share_{v}"] = res[f"diffusers_train_tflops_{v}"] / res["peak_tflops"]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print()
    print_table(res, variants)
    print()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
