"""Noise schedules and the diffusion math: pure tensor functions, no network, no loops, no I/O.

Notation follows Ho et al. 2020: beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s. The same
x_t is x_t = sqrt(abar_t) (x_0 + sigma_t eps) with sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of
Karras et al. 2022 (EDM), whose formulation (``formulation: edm``) trains on continuous noise levels and
samples on a discrete grid of them, so every sampler here serves both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


# EDM (Karras et al. 2022, Table 1 and Sec. 5): data standard deviation, log-normal training noise levels,
# and the sampling range with its rho = 7 spacing.
EDM_SIGMA_DATA = 0.5
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def karras_sigmas(num_steps: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                  rho: float = EDM_RHO) -> torch.Tensor:
    """Noise levels of Karras et al. 2022, Eq. 5, ascending (index 0 = sigma_min), in float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


class Schedule:
    """The precomputed schedule tensors (float32 on ``device``), indexed by integer timestep.

    ``formulation: edm`` has no betas of its own: its timesteps are T noise levels on the grid of
    :func:`karras_sigmas`, written as the abar_t = 1 / (1 + sigma_t^2) they imply, so the samplers below
    run unchanged; the network sees EDM's preconditioned input (sampling.EDMDenoiser).
    """

    def __init__(self, cfg: DiffusionConfig, device: torch.device | str = "cpu"):
        self.config = cfg
        self.num_steps = cfg.num_diffusion_timesteps
        self.formulation = cfg.formulation
        if cfg.formulation == "edm":
            abar = 1 / (1 + karras_sigmas(cfg.num_diffusion_timesteps) ** 2)
            betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        elif cfg.beta_schedule == "linear":
            betas = linear_betas(cfg.num_diffusion_timesteps, cfg.beta_start, cfg.beta_end)
        else:
            betas = cosine_betas(cfg.num_diffusion_timesteps)
        if cfg.formulation != "edm":
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
        self.sigmas = f32(((1 - abar) / abar).sqrt())  # the noise level sigma_t of each timestep

    @property
    def prediction_type(self) -> str:
        """What the network (as the samplers call it) returns: epsilon, v, or, for edm, the denoised image."""
        return "sample" if self.formulation == "edm" else self.config.prediction_type


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
    elif sched.prediction_type == "v":  # x_0 = a x_t - s v, eps = s x_t + a v
        x0 = a * x_t - s * pred
        eps = s * x_t + a * pred
    else:  # sample: the denoised image itself
        x0 = pred
        eps = (x_t - a * x0) / s
    return x0, eps


def min_snr_weight(sched: Schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 6-7), one per image: (B,).

    The paper weights the x_0 error by min(SNR, gamma), SNR_t = abar_t / (1 - abar_t). An eps error is SNR
    times the x_0 error, a v error (SNR + 1) times it, so the weight on the loss being computed is
    min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
    """
    abar = sched.alphas_cumprod.to(t.device)[t]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if sched.prediction_type == "epsilon" else clipped / (snr + 1)


def edm_training_sigmas(normal: torch.Tensor) -> torch.Tensor:
    """Training noise levels from standard normal draws: ln(sigma) ~ N(P_mean, P_std^2) (Karras et al., Sec. 5)."""
    return (normal * EDM_P_STD + EDM_P_MEAN).exp()


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in, c_noise) for noise levels sigma.

    The denoiser is D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), x = x_0 + sigma n.
    """
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


def edm_training_example(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network input c_in x, noise conditioning c_noise, target for F) at per-image noise levels ``sigma``.

    EDM's loss lambda(sigma) ||D - x_0||^2 with lambda = 1 / c_out^2 equals ||F - (x_0 - c_skip x) / c_out||^2
    (Karras et al., Eq. 8): the effective target with unit weight, so the loss code stays that of the others.
    """
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    shape = (-1, 1, 1, 1)
    x = x0 + sigma.view(shape) * noise
    return c_in.view(shape) * x, c_noise, (x0 - c_skip.view(shape) * x) / c_out.view(shape)


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
    if sched.prediction_type == "v":
        return a * x_t - s * pred, s * x_t + a * pred  # x_0 = a x_t - s v, eps = s x_t + a v
    return pred, (x_t - a * pred) / s  # sample


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


def heun_step(sched: Schedule, x_t: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor,
              denoise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One step of Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    In sigma space, x = x_t / sqrt(abar_t): d = (x - D(x; sigma)) / sigma, an Euler step to sigma_prev, then
    the trapezoid rule with the slope there; the step to the clean image (t_prev = -1) is the Euler step.
    ``x0`` is D at (x_t, t); ``denoise(x_{t_prev})`` evaluates D at the Euler point (in x_t scaling).
    """
    sigma, a = math.sqrt((1 - _abar(sched, t)) / _abar(sched, t)), math.sqrt(_abar(sched, t))
    x = x_t / a
    slope = (x - x0) / sigma
    if t_prev < 0:
        return x0
    sigma_prev, a_prev = math.sqrt((1 - _abar(sched, t_prev)) / _abar(sched, t_prev)), math.sqrt(_abar(sched, t_prev))
    euler = x + (sigma_prev - sigma) * slope
    slope_prev = (euler - denoise(euler * a_prev)) / sigma_prev
    return (x + (sigma_prev - sigma) * (slope + slope_prev) / 2) * a_prev


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
