"""Sampling loops (DDPM, DDIM, DPM-Solver++ 2M, Heun), progression grids, tiling and PNG writing. No UI: progress
goes to a callback. :func:`sampling_network` is the network as the samplers call it (EDM preconditioning included)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import diffusion
from .config import DiffusionConfig
from .diffusion import Schedule
from .errors import DdpmctlError
from .files import atomic_path
from .runtime import capture_cuda_graph, classify_oom, is_compiled

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "heun")
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "heun": "Heun"}  # as papers write them
GRID_PAD = 2  # white pixels between the tiles of a progression grid

# One generator for the whole batch, or one per image (then each image's noise is independent of the batch).
Generators = torch.Generator | Sequence[torch.Generator] | None
Network = Callable[..., torch.Tensor]  # (x_t, t[, class labels]) -> the network's prediction

# Classifier-free guidance scale w of class-conditional sampling when none is given, from benchmarks/guidance_scale.py
# (docs/classes.md): the smallest w at which the samples' class accuracy reached its top; a larger w moved
# the samples further from the real images (a Frechet distance that grew with w), as Ho & Salimans 2022 found.
DEFAULT_GUIDANCE = 1.0
MAX_CLASS_ROWS = 16  # grids of a class-conditional model show one row per class, for the first this many classes


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on the CPU
    frames: list[torch.Tensor] = field(default_factory=list)  # x_t at each recorded step, each (B, 3, H, W)
    frames_x0: list[torch.Tensor] = field(default_factory=list)  # predicted x_0 at the same steps
    frame_steps: list[int] = field(default_factory=list)  # the timestep of each recorded frame


def recommended_sampler(cfg: DiffusionConfig) -> tuple[str, int]:
    """The sampler and step count to use when none is asked for (docs/quality.md#sampling-steps).

    Deterministic second-order samplers reach a given quality in the fewest network calls. DDPM-formulation
    models: DPM-Solver++(2M) (Lu et al. 2022) at 20 steps, where the benchmark's FD levelled off. EDM models:
    Heun on EDM's noise levels at EDM's own 18 steps for 32 px (Karras et al. 2022, 35 network calls).
    """
    if cfg.formulation == "edm":
        return "heun", 18
    return "dpmpp2m", 20


def sampler_timesteps(num_steps: int, sampler: str, steps: int | None) -> list[int]:
    """The descending timesteps a sampler visits: all T for ddpm, ``steps`` evenly spaced ones otherwise."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}")
    return diffusion.timestep_subsequence(num_steps, None if sampler == "ddpm" else steps)


def record_steps(timesteps: list[int], every: int | None, max_frames: int | None = None,
                 num_steps: int | None = None) -> list[int]:
    """Timesteps at which to record a grid column, descending; the first (pure noise) is always one.

    Visiting every timestep: x_T, then every ``every`` timesteps (t % every == 0). Visiting a subsequence
    (DDIM, DPM-Solver): the same number of columns, evenly spaced over it. ``max_frames`` caps the count.
    """
    if not timesteps:
        return []
    total = num_steps or (timesteps[0] + 1)
    if every is None or every <= 0:
        chosen = list(timesteps)
    elif len(timesteps) >= total:
        chosen = [timesteps[0]] + [t for t in timesteps[1:] if t % every == 0]
    else:
        chosen = _evenly(timesteps, math.ceil(total / every) + 1)
    if max_frames and len(chosen) > max_frames:
        chosen = _evenly(chosen, max_frames)
    return chosen


def _evenly(items: list[int], count: int) -> list[int]:
    """``count`` items spread evenly over ``items``, first and last included."""
    if count >= len(items):
        return list(items)
    if count <= 1:
        return items[:1]
    idx = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in idx]


def randn_like_batch(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (float32), from one generator or one per image, drawn on the
    generators' device (the CPU for MPS: runtime.generator_device) and moved to x's."""
    if generator is None or isinstance(generator, torch.Generator):
        where = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=where).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator]).to(x.device)


class EDMDenoiser(nn.Module):
    """An EDM-trained network as the samplers call it: (x_t, t) -> the denoised image D(x; sigma_t).

    x = x_t / sqrt(abar_t) = x_0 + sigma_t n, then D = c_skip x + c_out F(c_in x; c_noise) (Karras et al.
    2022, Table 1); the schedule's prediction type for edm is "sample".
    """

    def __init__(self, net: nn.Module, sched: Schedule):
        super().__init__()
        self.net = net
        self.register_buffer("sigmas", sched.sigmas.clone(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas.to(x_t.device)[t]
        c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(sigma)
        x = x_t.float() * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
        out = self.net((c_in.view(-1, 1, 1, 1) * x).to(x_t.dtype), c_noise, *cond)  # cond: class labels
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out.float()


def sampling_network(net: nn.Module, sched: Schedule) -> nn.Module:
    """The network as :func:`sample` calls it: itself, or wrapped in EDM's preconditioning for edm."""
    return EDMDenoiser(net, sched) if sched.formulation == "edm" else net


def guided(model: Network, labels: torch.Tensor, scale: float) -> Network:
    """The network as the samplers call it, (x_t, t) -> prediction, for classes ``labels`` (B,) guided by ``scale``.

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6): eps~ = (1 + w) eps(x_t, c) - w eps(x_t), the
    conditional and the unconditional ("no class", label -1) passes in one batch. The two weights sum to
    one, and v, x_0 and EDM's denoised image are each affine in eps at a given x_t, so the same combination
    of the network's output is that guidance whatever the model predicts.
    """

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 0:
            return model(x, t, labels)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)]))
        cond, uncond = out.float().chunk(2)
        return cond + scale * (cond - uncond)

    return call


def _denoise_step(model: Network, sched: Schedule, x: torch.Tensor, t: int, t_prev: int, sampler: str, eta: float,
                  generator: Generators, autocast: Callable[[], contextlib.AbstractContextManager],
                  in_dtype: torch.dtype, last: tuple[torch.Tensor | None, int | None]):
    """One step x_t -> x_{t_prev}: (x_prev, x0_hat, the (x0, t) a second-order sampler keeps for its next step)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    with autocast():
        pred = model(x.to(in_dtype), tt)
    if sampler == "heun":
        x0 = diffusion.split_prediction(sched, x, tt, pred)[0].clamp(-1, 1)

        def denoise(x_prev: torch.Tensor) -> torch.Tensor:  # D at the Euler point, one more network call
            with autocast():
                out = model(x_prev.to(in_dtype), torch.full_like(tt, t_prev))
            return diffusion.split_prediction(sched, x_prev, torch.full_like(tt, t_prev), out)[0].clamp(-1, 1)

        return diffusion.heun_step(sched, x, t, t_prev, x0, denoise), x0, last
    if sampler == "ddpm":
        z = randn_like_batch(x, generator) if t > 0 else None
        x_next, x0 = diffusion.ddpm_step(sched, x, t, pred, z)
    elif sampler == "ddim":
        z = randn_like_batch(x, generator) if eta > 0 and t_prev >= 0 else None
        x_next, x0 = diffusion.ddim_step(sched, x, t, t_prev, pred, eta, z)
    else:  # dpmpp2m
        x0, _ = diffusion.split_prediction(sched, x, tt, pred)
        x0 = x0.clamp(-1, 1)
        x_next = diffusion.dpmpp_2m_step(sched, x, t, t_prev, x0, last[0], last[1])
        last = (x0, t)
    return x_next, x0, last


class SamplingGraphs:
    """Whole deterministic sampling loops (DDIM with eta 0, DPM-Solver++) captured as CUDA graphs.

    A 50-step loop of a UNet at 32 px is ~20,000 small kernels; replaying them from one graph removes the
    per-kernel launch cost, which dominates at low resolution. One graph is kept (the last batch shape,
    sampler and timesteps); the first batch of a shape pays one warm-up step and the capture.
    """

    def __init__(self) -> None:
        self.failed: str | None = None  # why capture failed (then sample() runs eagerly)
        self.reset()

    def reset(self) -> None:
        self.key: tuple | None = None
        self.inputs: tuple | None = None  # the model, schedule and autocast the graph was captured with
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None  # class labels read by the graph (class-conditional models)
        self.static_out: torch.Tensor | None = None

    @staticmethod
    def eligible(device: torch.device, sampler: str, eta: float, record: bool) -> bool:
        return device.type == "cuda" and not record and (sampler in ("dpmpp2m", "heun") or (sampler == "ddim" and eta == 0))

    def run(self, model: nn.Module, sched: Schedule, noise: torch.Tensor, sampler: str, timesteps: list[int],
            autocast: Callable[[], contextlib.AbstractContextManager], labels: torch.Tensor | None = None,
            guidance: float = 0.0) -> torch.Tensor:
        key = (tuple(noise.shape), noise.dtype, sampler, tuple(timesteps), labels is None, guidance)
        if key != self.key or (model, sched, autocast) != self.inputs:
            self.reset()  # free the last graph's memory first
            static_in = noise.clone()
            static_labels = None if labels is None else labels.clone()  # copied into before each replay, as noise
            net = model if static_labels is None else guided(model, static_labels, guidance)

            def loop() -> torch.Tensor:
                x, last = static_in.float(), (None, None)
                for i, t in enumerate(timesteps):
                    t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                    x, _, last = _denoise_step(net, sched, x, t, t_prev, sampler, 0.0, None, autocast,
                                               noise.dtype, last)
                return x.clamp(-1, 1)

            def warmup() -> None:  # one eager step: cuDNN autotuning happens outside the capture
                _denoise_step(net, sched, static_in.float(), timesteps[0], -1 if len(timesteps) < 2 else timesteps[1],
                              sampler, 0.0, None, autocast, noise.dtype, (None, None))

            graph, static_out = capture_cuda_graph(noise.device, warmup, loop)
            self.key, self.graph, self.static_in, self.static_out = key, graph, static_in, static_out
            self.static_labels, self.inputs = static_labels, (model, sched, autocast)
        else:
            self.static_in.copy_(noise)
            if labels is not None:
                self.static_labels.copy_(labels)
        self.graph.replay()
        return self.static_out.float().cpu()


@torch.no_grad()
def sample(
    model: nn.Module,
    sched: Schedule,
    noise: torch.Tensor,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    record_every: int | None = None,
    max_frames: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    callback: Callable[[int, int], None] | None = None,
    record: bool | None = None,
    graphs: SamplingGraphs | None = None,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
) -> SampleResult:
    """Denoise ``noise`` (x_T) into images; records x_t and x0_hat for progression grids.

    ``sampler`` is 'ddpm' (Ho et al. Alg. 2, all timesteps), 'ddim' (Song et al., ``steps`` and ``eta``),
    'dpmpp2m' (Lu et al. 2022, deterministic) or 'heun' (Karras et al. 2022, deterministic, two network
    calls per step but the last). ``generator`` (one, or one per image) drives the
    per-step noise so a seed repeats a run. Frames are recorded when ``record`` is true (default: when
    ``record_every`` is given). ``callback(i, n)`` is called after each of the n steps. With ``graphs``
    on CUDA, a deterministic loop that records nothing runs as one replayed CUDA graph (the callback
    then hears of all steps at the end). A class-conditional model samples classes ``labels`` (B,) on the
    device, with classifier-free guidance of scale ``guidance`` (:func:`guided`).
    """
    device = noise.device
    timesteps = sampler_timesteps(sched.num_steps, sampler, steps)
    if record is None:
        record = record_every is not None
    if (graphs is not None and graphs.failed is None and not is_compiled(model)  # see runtime.prepare_for_sampling
            and SamplingGraphs.eligible(device, sampler, eta, record)):
        try:
            images = graphs.run(model, sched, noise, sampler, timesteps, autocast, labels, guidance)
        except DdpmctlError:
            raise
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: sample eagerly from now on
            graphs.reset()
            if classify_oom(exc) is not None:
                raise  # the caller halves the batch
            graphs.failed = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); sampling without it"
        else:
            if callback is not None:
                callback(len(timesteps), len(timesteps))
            return SampleResult(images=images)
    recorded = set(record_steps(timesteps, record_every, max_frames, sched.num_steps)) if record else set()
    net = model if labels is None else guided(model, labels, guidance)
    result = SampleResult(images=noise)
    x = noise.float()
    last: tuple[torch.Tensor | None, int | None] = (None, None)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_next, x0, last = _denoise_step(net, sched, x, t, t_prev, sampler, eta, generator, autocast, noise.dtype, last)
        if t in recorded:
            result.frames.append(x.float().cpu())
            result.frames_x0.append(x0.float().cpu())
            result.frame_steps.append(t)
        x = x_next
        if callback is not None:
            callback(i + 1, len(timesteps))
    result.images = x.clamp(-1, 1).float().cpu()
    return result


def grid_size(rows: int, columns: int, height: int, width: int, show_x0: bool = False,
              pad: int = GRID_PAD) -> tuple[int, int]:
    """(H, W) in pixels of a progression grid of ``rows`` samples and ``columns`` columns."""
    r = rows * (2 if show_x0 else 1)
    return r * height + (r - 1) * pad, columns * width + (columns - 1) * pad


def tile(images: torch.Tensor, columns: int, pad: int = GRID_PAD, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images row-major, ``columns`` to a row, into one (C, H', W') image.

    Tiles are separated by ``pad`` pixels of ``pad_value`` (1.0 is white for [-1, 1] images); there is no
    border around the whole, and a short last row is filled with ``pad_value``.
    """
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    out = images.new_full((c, rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad), pad_value)
    for i in range(n):
        r, col = divmod(i, columns)
        out[:, r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = images[i]
    return out


def progression_grid(result: SampleResult, show_x0: bool = False, pad: int = GRID_PAD) -> torch.Tensor:
    """A (3, H', W') image in [-1, 1]: a row per sample, columns x_T ... x_0 and the final image.

    With ``show_x0`` each sample's row is followed by a row of the model's predicted x_0 at the same
    columns (its last tile is the final image again). Tiles are separated by ``pad`` white pixels.
    """
    columns = result.frames + [result.images]
    columns_x0 = result.frames_x0 + [result.images]
    rows: list[torch.Tensor] = []
    for b in range(result.images.shape[0]):
        rows.append(torch.stack([c[b] for c in columns]))
        if show_x0:
            rows.append(torch.stack([c[b] for c in columns_x0]))
    return tile(torch.cat(rows).float().clamp(-1, 1), len(columns), pad)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (..., 3, H, W) -> uint8 of the same shape and device: the pixels of the PNGs."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image as PNG atomically (a temporary file, then a rename).

    ``image`` is float in [-1, 1] (what the samplers return; converted by :func:`to_uint8`) or uint8.
    """
    from PIL import Image  # imported here: the sampling loop itself does not need Pillow

    path = Path(path)
    pixels = image if image.dtype == torch.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), "RGB").save(tmp, format="PNG")
    return path
