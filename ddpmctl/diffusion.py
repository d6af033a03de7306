"""Noise schedules and the diffusion math: pure tensor functions, no network, no loops, no I/O.

Notation follows Ho et al. 2020: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import DiffusionConfig


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. 2020, Sec. 4 (1e-4 to 0.02 over T=1000), in float64."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, Eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class Schedule:
    """The precomputed schedule tensors (float32 on ``device``), indexed by integer timestep."""

    def __init__(self, cfg: DiffusionConfig, device: torch.device | str = "cpu"):
        self.config = cfg
        self.num_steps = cfg.num_diffusion_timesteps
        if cfg.beta_schedule == "linear":
            betas = linear_betas(cfg.num_diffusion_timesteps, cfg.beta_start, cfg.beta_end)
        else:
            betas = cosine_betas(cfg.num_diffusion_timesteps)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        f32 = lambda x: x.to(device=device, dtype=torch.float32)  # noqa: E731
        self.betas = f32(betas)
        self.alphas_cumprod = f32(abar)
        self.alphas_cumprod_prev = f32(abar_prev)
        self.sqrt_abar = f32(abar.sqrt())
        self.sqrt_one_minus_abar = f32((1 - abar).sqrt())
        # Posterior q(x_{t-1} | x_t, x_0), Ho et al. Eq. 6-7.
        self.posterior_variance = f32(betas * (1 - abar_prev) / (1 - abar))
        self.posterior_mean_coef1 = f32(betas * abar_prev.sqrt() / (1 - abar))
        self.posterior_mean_coef2 = f32((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type


def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return values.to(t.device)[t].view(-1, 1, 1, 1)


def q_sample(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Closed-form forward process, Ho et al. Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return _at(sched.sqrt_abar, t) * x0 + _at(sched.sqrt_one_minus_abar, t) * noise


def training_target(sched: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the network learns: eps (Ho et al.) or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)."""
    if sched.prediction_type == "epsilon":
        return noise
    return _at(sched.sqrt_abar, t) * noise - _at(sched.sqrt_one_minus_abar, t) * x0


def split_prediction(
    sched: Schedule, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the network output into (x0_hat, eps_hat), whatever it was trained to predict."""
    a, s = _at(sched.sqrt_abar, t), _at(sched.sqrt_one_minus_abar, t)
    pred = pred.float()
    if sched.prediction_type == "epsilon":
        eps = pred
        x0 = (x_t - s * eps) / a
    else:  # v: x_0 = a x_t - s v, eps = s x_t + a v
        x0 = a * x_t - s * pred
        eps = s * x_t + a * pred
    return x0, eps


def loss_fn(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss between prediction and target: mse (Ho et al. L_simple), mae or huber (smooth L1)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mae":
        return F.l1_loss(pred, target)
    if kind == "huber":
        return F.smooth_l1_loss(pred, target)
    raise ValueError(f"unknown loss {kind!r}")


def ddpm_step(
    sched: Schedule, x_t: torch.Tensor, t: int, pred: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2, posterior mean of Eq. 7, sigma^2 = beta-tilde).

    Returns (x_{t-1}, x0_hat). ``noise`` is ignored at t = 0.
    """
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0, _ = split_prediction(sched, x_t, tt, pred)
    x0 = x0.clamp(-1, 1)
    mean = _at(sched.posterior_mean_coef1, tt) * x0 + _at(sched.posterior_mean_coef2, tt) * x_t
    if t == 0 or noise is None:
        return mean, x0
    return mean + _at(sched.posterior_variance, tt).sqrt() * noise, x0


def ddim_step(
    sched: Schedule, x_t: torch.Tensor, t: int, t_prev: int, pred: torch.Tensor, eta: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12); t_prev = -1 means the clean image."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0, eps = split_prediction(sched, x_t, tt, pred)
    x0 = x0.clamp(-1, 1)
    abar_t = sched.alphas_cumprod[t]
    abar_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar_t)
    # Re-derive eps from the clipped x0 so the step stays consistent with it.
    eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    x_prev = abar_prev.sqrt() * x0 + direction
    if noise is not None and t_prev >= 0 and eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def dpmpp_2m_step(
    sched: Schedule, x_t: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor, x0_last: torch.Tensor | None,
    t_last: int | None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step in log-SNR time (Lu et al. 2022, Algorithm 2), data prediction x0."""

    def lam(step: int) -> torch.Tensor:  # half log-SNR: log(alpha / sigma)
        abar = sched.alphas_cumprod[step]
        return 0.5 * torch.log(abar / (1 - abar))

    abar_t = sched.alphas_cumprod[t]
    if t_prev < 0:
        return x0
    abar_prev = sched.alphas_cumprod[t_prev]
    sigma_t, sigma_prev = (1 - abar_t).sqrt(), (1 - abar_prev).sqrt()
    h = lam(t_prev) - lam(t)
    d = x0
    if x0_last is not None and t_last is not None:
        r = (lam(t) - lam(t_last)) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
    return (sigma_prev / sigma_t) * x_t - abar_prev.sqrt() * torch.expm1(-h) * d


def timestep_subsequence(num_steps: int, sampling_steps: int | None) -> list[int]:
    """Evenly spaced timesteps, descending from T-1 (the 'trailing' spacing of Lin et al. 2024)."""
    if not sampling_steps or sampling_steps >= num_steps:
        return list(range(num_steps - 1, -1, -1))
    stride = num_steps / sampling_steps
    return sorted({round(num_steps - 1 - i * stride) for i in range(sampling_steps)}, reverse=True)
