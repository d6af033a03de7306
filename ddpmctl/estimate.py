"""How long a run's parts take, from a measured training step: shared by the engine's first notes and
``train --dry-run``, so both say the same about the progression grids."""

from __future__ import annotations

from .config import Config
from .sampling import sampler_timesteps

# A training step is forward + backward, about 3 forwards (the FLOPs cost.model_cost counts); a sampler
# step is one forward without autograd, so a denoising step costs about a third of an image's training step.
FORWARD_SHARE = 1 / 3
CHEAP_SAMPLER = ("ddim", 50)  # what the hint suggests for grids: DDIM over 50 timesteps (Song et al. 2021)
LONG_GRID_S = 30.0  # a grid slower than this gets the hint


def duration(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` under two days, else days with one decimal."""
    seconds = max(float(seconds), 0.0)
    if seconds >= 48 * 3600:
        return f"{seconds / 86400:.1f} days"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def evaluations(cfg: Config, start_step: int = 0) -> int:
    """Grids (and checkpoints) a run writes from ``start_step`` on: every evaluation_interval steps, and at the end."""
    total, every = cfg.training.num_training_steps, cfg.sampling.evaluation_interval
    if start_step >= total:
        return 0
    count = total // every - start_step // every
    return count + (0 if total % every == 0 else 1)


def grid_denoise_steps(cfg: Config, sampler: str | None = None, steps: int | None = None) -> int:
    """The network calls of one grid: every timestep for ddpm, ``sampling_steps`` of them for ddim/dpmpp2m."""
    s = cfg.sampling
    chosen = sampler or s.sampler
    return len(sampler_timesteps(cfg.diffusion.num_diffusion_timesteps, chosen,
                                 steps if sampler else s.sampling_steps))


def grid_seconds(cfg: Config, train_seconds_per_image: float, sampler: str | None = None,
                 steps: int | None = None) -> float:
    """About how long one grid samples, from the measured training time per image."""
    per_call = cfg.sampling.num_generations * train_seconds_per_image * FORWARD_SHARE
    return grid_denoise_steps(cfg, sampler, steps) * per_call


def grid_note(cfg: Config, train_seconds_per_image: float, start_step: int = 0) -> str:
    """One line: which sampler the grids use, how many there are and how long each takes; when that is long,
    how to make them cheaper."""
    s, n = cfg.sampling, grid_denoise_steps(cfg)
    count, every = evaluations(cfg, start_step), s.evaluation_interval
    seconds = grid_seconds(cfg, train_seconds_per_image)
    when = (f"{count} grids, one every {every} steps" + ("" if cfg.training.num_training_steps % every == 0
                                                          else " and at the end")) if count > 1 else "one grid, at the end"
    each = "under a second" if seconds < 1 else f"about {duration(seconds)}"
    line = (f"grids: {s.num_generations} images sampled with {s.sampler} over "
            f"{'all ' if n == cfg.diffusion.num_diffusion_timesteps else ''}{n} timesteps, {when}; {each} each here")
    cheap, cheap_steps = CHEAP_SAMPLER
    if seconds > LONG_GRID_S and n > cheap_steps:
        line += (f"; --sampler {cheap} --sampling-steps {cheap_steps} would take about "
                 f"{duration(grid_seconds(cfg, train_seconds_per_image, cheap, cheap_steps))}")
    return line
