"""Sampling loops (DDPM, DDIM, DPM-Solver++ 2M) and progression grids. No UI: progress goes to a callback."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusion
from .diffusion import Schedule

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
GRID_PAD = 2  # white pixels between the tiles of a progression grid

# One generator for the whole batch, or one per image (then each image's noise is independent of the batch).
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on the CPU
    frames: list[torch.Tensor] = field(default_factory=list)  # x_t at each recorded step, each (B, 3, H, W)
    frames_x0: list[torch.Tensor] = field(default_factory=list)  # predicted x_0 at the same steps
    frame_steps: list[int] = field(default_factory=list)  # the timestep of each recorded frame


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
    """Standard normal noise shaped like ``x`` (float32), from one generator or one per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generator])


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
) -> SampleResult:
    """Denoise ``noise`` (x_T) into images; records x_t and x0_hat for progression grids.

    ``sampler`` is 'ddpm' (Ho et al. Alg. 2, all timesteps), 'ddim' (Song et al., ``steps`` and ``eta``)
    or 'dpmpp2m' (Lu et al. 2022, deterministic). ``generator`` (one, or one per image) drives the
    per-step noise so a seed repeats a run. Frames are recorded when ``record`` is true (default: when
    ``record_every`` is given). ``callback(i, n)`` is called after each of the n steps.
    """
    device = noise.device
    timesteps = sampler_timesteps(sched.num_steps, sampler, steps)
    if record is None:
        record = record_every is not None
    recorded = set(record_steps(timesteps, record_every, max_frames, sched.num_steps)) if record else set()
    result = SampleResult(images=noise)
    x = noise.float()
    x0_last, t_last = None, None
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        with autocast():
            pred = model(x.to(noise.dtype), tt)
        if sampler == "ddpm":
            z = randn_like_batch(x, generator) if t > 0 else None
            x_next, x0 = diffusion.ddpm_step(sched, x, t, pred, z)
        elif sampler == "ddim":
            z = randn_like_batch(x, generator) if eta > 0 and t_prev >= 0 else None
            x_next, x0 = diffusion.ddim_step(sched, x, t, t_prev, pred, eta, z)
        else:  # dpmpp2m
            x0, _ = diffusion.split_prediction(sched, x, tt, pred)
            x0 = x0.clamp(-1, 1)
            x_next = diffusion.dpmpp_2m_step(sched, x, t, t_prev, x0, x0_last, t_last)
            x0_last, t_last = x0, t
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


def progression_grid(result: SampleResult, show_x0: bool = False, pad: int = GRID_PAD) -> torch.Tensor:
    """A (3, H', W') image in [0, 1]: a row per sample, columns x_T ... x_0 and the final image.

    With ``show_x0`` each sample's row is followed by a row of the model's predicted x_0 at the same
    columns (its last tile is the final image again). Tiles are separated by ``pad`` white pixels.
    """
    columns = result.frames + [result.images]
    columns_x0 = result.frames_x0 + [result.images]
    tiles_rows: list[list[torch.Tensor]] = []
    for b in range(result.images.shape[0]):
        tiles_rows.append([c[b] for c in columns])
        if show_x0:
            tiles_rows.append([c[b] for c in columns_x0])

    def hcat(tiles: list[torch.Tensor]) -> torch.Tensor:
        padded = [F.pad(t, (0, pad), value=1.0) for t in tiles[:-1]] + [tiles[-1]]
        return torch.cat(padded, dim=-1)

    rows = [hcat([(t.clamp(-1, 1) + 1) / 2 for t in r]) for r in tiles_rows]
    rows = [F.pad(r, (0, 0, 0, pad), value=1.0) for r in rows[:-1]] + [rows[-1]]
    return torch.cat(rows, dim=-2).float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B, 3, H, W) -> uint8 (B, H, W, 3) for saving."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
