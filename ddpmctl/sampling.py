"""Sampling loops (DDPM, DDIM, DPM-Solver++ 2M) and progression grids. No UI: progress goes to a callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import diffusion
from .diffusion import Schedule


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on the CPU
    frames: list[torch.Tensor] = field(default_factory=list)  # x_t at each recorded step, each (B, 3, H, W)
    frames_x0: list[torch.Tensor] = field(default_factory=list)  # predicted x_0 at the same steps
    frame_steps: list[int] = field(default_factory=list)  # the timestep of each recorded frame


def record_steps(timesteps: list[int], every: int | None) -> set[int]:
    """Timesteps at which to record a grid column: every ``every`` timesteps (DDPM) or all steps (few-step samplers)."""
    if every is None or len(timesteps) <= 1:
        return set(timesteps)
    return {t for t in timesteps if t % every == 0}


@torch.no_grad()
def sample(
    model: nn.Module,
    sched: Schedule,
    noise: torch.Tensor,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    record_every: int | None = None,
    max_frames: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    callback: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Denoise ``noise`` (x_T) into images; records x_t and x0_hat for progression grids.

    ``sampler`` is 'ddpm' (Ho et al. Alg. 2, all timesteps), 'ddim' (Song et al., ``steps`` and ``eta``)
    or 'dpmpp2m' (Lu et al. 2022). ``generator`` drives the per-step noise so a seed repeats a run.
    ``callback(i, n)`` is called after each of the n steps.
    """
    device = noise.device
    timesteps = diffusion.timestep_subsequence(sched.num_steps, None if sampler == "ddpm" else steps)
    if sampler != "ddpm" and record_every is not None and len(timesteps) < sched.num_steps:
        record_every = None
    recorded = record_steps(timesteps, record_every)
    if max_frames and len(recorded) > max_frames:
        ordered = sorted(recorded, reverse=True)
        idx = torch.linspace(0, len(ordered) - 1, max_frames).round().long().tolist()
        recorded = {ordered[i] for i in idx}
    result = SampleResult(images=noise)
    x = noise.float()
    x0_last, t_last = None, None
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        with autocast():
            pred = model(x.to(noise.dtype), tt)
        if sampler == "ddpm":
            z = torch.randn(x.shape, generator=generator, device=device) if t > 0 else None
            x_next, x0 = diffusion.ddpm_step(sched, x, t, pred, z)
        elif sampler == "ddim":
            z = torch.randn(x.shape, generator=generator, device=device) if eta > 0 and t_prev >= 0 else None
            x_next, x0 = diffusion.ddim_step(sched, x, t, t_prev, pred, eta, z)
        elif sampler == "dpmpp2m":
            x0, _ = diffusion.split_prediction(sched, x, tt, pred)
            x0 = x0.clamp(-1, 1)
            x_next = diffusion.dpmpp_2m_step(sched, x, t, t_prev, x0, x0_last, t_last)
            x0_last, t_last = x0, t
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        if t in recorded:
            result.frames.append(x.float().cpu())
            result.frames_x0.append(x0.float().cpu())
            result.frame_steps.append(t)
        x = x_next
        if callback is not None:
            callback(i + 1, len(timesteps))
    result.images = x.clamp(-1, 1).float().cpu()
    return result


def progression_grid(result: SampleResult, show_x0: bool = False) -> torch.Tensor:
    """A (3, H', W') image in [0, 1]: a row per sample, columns x_T ... x_0 (with an x0_hat row under each if asked)."""
    columns = result.frames + [result.images]
    rows = []
    for b in range(result.images.shape[0]):
        rows.append(torch.cat([c[b] for c in columns], dim=-1))
        if show_x0:
            rows.append(torch.cat([c[b] for c in result.frames_x0] + [result.images[b]], dim=-1))
    pad = 2
    padded = [torch.nn.functional.pad(r, (0, 0, 0, pad), value=1.0) for r in rows]
    grid = torch.cat(padded, dim=-2)[:, :-pad]
    return ((grid.clamp(-1, 1) + 1) / 2).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, 3, H, W) -> uint8 (B, H, W, 3) for saving."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
