"""Noise schedules and the diffusion math: pure tensor functions, no network, no loops, no I/O.

Notation follows Ho et al. 2020: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s.
"""

from __future__ import annotations

import math

import numpy as np
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

        def f32(x: torch.Tensor) -> torch.Tensor:  # cast on the CPU first: MPS has no float64
            return x.to(torch.float32).to(device)

        # float64 copies on the CPU: sampler steps take their coefficients as Python floats (exact, and no
        # tiny device kernels per step; the posterior of Ho et al. Eq. 6-7 is computed there, in ddpm_step).
        # The float32 device tensors serve per-sample timesteps in training.
        self.abar64 = abar.clone()
        self.betas64 = betas.clone()
        self.betas = f32(betas)
        self.alphas_cumprod = f32(abar)
        self.sqrt_abar = f32(abar.sqrt())
        self.sqrt_one_minus_abar = f32((1 - abar).sqrt())

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


def loss_fn(pred: torch.Tensor, target: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    """Loss between prediction and target (mean, or per element): mse (Ho et al. L_simple), mae or huber (smooth L1)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target, reduction=reduction)
    if kind == "mae":
        return F.l1_loss(pred, target, reduction=reduction)
    if kind == "huber":
        return F.smooth_l1_loss(pred, target, reduction=reduction)
    raise ValueError(f"unknown loss {kind!r}")


def _abar(sched: Schedule, t: int) -> float:
    """abar_t as a Python float (float64); t = -1 is the clean image, abar = 1."""
    return 1.0 if t < 0 else float(sched.abar64[t])


def _split_scalar(sched: Schedule, x_t: torch.Tensor, t: int, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """split_prediction for one timestep shared by the whole batch, with float64 coefficients."""
    abar = _abar(sched, t)
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    pred = pred.float()
    if sched.prediction_type == "epsilon":
        return (x_t - s * pred) / a, pred
    return a * x_t - s * pred, s * x_t + a * pred  # v: x_0 = a x_t - s v, eps = s x_t + a v


def ddpm_step(
    sched: Schedule, x_t: torch.Tensor, t: int, pred: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2, posterior mean of Eq. 7, sigma^2 = beta-tilde).

    The network's x_0 is clipped to [-1, 1] before it enters the posterior mean (Ho et al.'s released
    code does the same). Returns (x_{t-1}, x0_hat). ``noise`` is ignored at t = 0.
    """
    x0, _ = _split_scalar(sched, x_t, t, pred)
    x0 = x0.clamp(-1, 1)
    abar, abar_prev, beta = _abar(sched, t), _abar(sched, t - 1), float(sched.betas64[t])
    coef1 = beta * math.sqrt(abar_prev) / (1 - abar)  # Eq. 7
    coef2 = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)
    mean = coef1 * x0 + coef2 * x_t
    if t == 0 or noise is None:
        return mean, x0
    variance = beta * (1 - abar_prev) / (1 - abar)  # beta-tilde_t
    return mean + math.sqrt(variance) * noise, x0


def ddim_step(
    sched: Schedule, x_t: torch.Tensor, t: int, t_prev: int, pred: torch.Tensor, eta: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12 with sigma of Eq. 16); t_prev = -1 is the clean image."""
    x0, _ = _split_scalar(sched, x_t, t, pred)
    x0 = x0.clamp(-1, 1)
    abar_t, abar_prev = _abar(sched, t), _abar(sched, t_prev)
    # Re-derive eps from the clipped x0 so the step stays consistent with it.
    eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    sigma = eta * math.sqrt(max(0.0, (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1 - abar_prev - sigma**2)) * eps
    if noise is not None and t_prev >= 0 and sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def dpmpp_2m_step(
    sched: Schedule, x_t: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor, x0_last: torch.Tensor | None,
    t_last: int | None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step in log-SNR time (Lu et al. 2022, Algorithm 2), data prediction x0.

    With lambda = log(alpha / sigma), h = lambda_prev - lambda_t and r = h_last / h:
    x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D, D = (1 + 1/2r) x0 - (1/2r) x0_last.
    The step to the clean image (t_prev = -1, sigma = 0) is the limit h -> inf: x_prev = x0.
    """
    if t_prev < 0:
        return x0

    def lam(step: int) -> float:  # half log-SNR: log(alpha / sigma)
        abar = _abar(sched, step)
        return 0.5 * math.log(abar / (1 - abar))

    abar_t, abar_prev = _abar(sched, t), _abar(sched, t_prev)
    h = lam(t_prev) - lam(t)
    d = x0
    if x0_last is not None and t_last is not None:
        r = (lam(t) - lam(t_last)) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
    return math.sqrt((1 - abar_prev) / (1 - abar_t)) * x_t - math.sqrt(abar_prev) * math.expm1(-h) * d


def timestep_subsequence(num_steps: int, sampling_steps: int | None) -> list[int]:
    """Evenly spaced timesteps, descending from T-1: the 'trailing' spacing of Lin et al. 2024 (Table 2).

    Computed as their reference code does, round(arange(T, 0, -T/n)) - 1 with numpy's arange, so the
    timesteps equal diffusers' timestep_spacing="trailing" even where a value falls half-way between two
    integers (n = 16, 48, ... for T = 1000; tests/test_reference.py). Always n of them (numpy's float step
    can yield an extra, last one).
    """
    if not sampling_steps or sampling_steps >= num_steps:
        return list(range(num_steps - 1, -1, -1))
    spaced = np.round(np.arange(num_steps, 0, -num_steps / sampling_steps))[:sampling_steps].astype(np.int64) - 1
    return sorted({int(t) for t in spaced}, reverse=True)
