"""The diffusion math against the papers: schedules, objectives, and each sampler step."""

from __future__ import annotations

import math

import pytest
import torch

from ddpmctl import diffusion
from ddpmctl.config import DiffusionConfig
from ddpmctl.diffusion import Schedule
from ddpmctl.sampling import sample


def sched(**kw) -> Schedule:
    return Schedule(DiffusionConfig(**kw))


def test_linear_schedule_matches_ho_et_al():
    s = sched()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.alphas_cumprod.double(), abar, rtol=1e-5, atol=1e-9)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # x_T is almost pure noise


def test_cosine_schedule_matches_the_closed_form():
    """Nichol & Dhariwal Eq. 17: abar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008."""
    T, s = 1000, 0.008
    sc = sched(beta_schedule="cosine", num_diffusion_timesteps=T)

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # Index i holds timestep i + 1 (the first noising step is index 0).
    for i in (0, 1, 10, 100, 250, 500, 750, 900, 990):
        assert sc.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-4, abs=1e-7), i
    assert sc.betas.max().item() == pytest.approx(0.999)  # clipped at the end, as in the paper
    assert sc.alphas_cumprod[499].item() == pytest.approx(0.5, abs=0.02)  # half-way is half signal


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_prediction_round_trip(prediction_type):
    """The target built for training is turned back into exactly (x0, eps) at sampling (Salimans & Ho v)."""
    s = sched(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((6, 3, 4, 4), generator=g) * 2 - 1
    eps = torch.randn((6, 3, 4, 4), generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = diffusion.q_sample(s, x0, t, eps)
    target = diffusion.training_target(s, x0, t, eps)
    if prediction_type == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * eps - (1 - a).sqrt() * x0)
    x0_hat, eps_hat = diffusion.split_prediction(s, x_t, t, target)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
    if prediction_type == "v":  # exact at every t (eps-prediction divides by sqrt(abar_T), tiny near T)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(x0_hat[:4], x0[:4], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_one_and_all_steps_is_ddpm(schedule):
    """Song et al. Eq. 16: eta = 1 gives sigma_t^2 = beta-tilde_t, and the same mean as Ho et al. Eq. 7."""
    s = sched(beta_schedule=schedule)
    g = torch.Generator().manual_seed(1)
    for t in (999, 700, 300, 50, 1):
        x_t = torch.randn((4, 3, 4, 4), generator=g)
        pred = torch.randn((4, 3, 4, 4), generator=g)
        z = torch.randn((4, 3, 4, 4), generator=g)
        mean_ddpm, _ = diffusion.ddpm_step(s, x_t, t, pred, None)
        mean_ddim, _ = diffusion.ddim_step(s, x_t, t, t - 1, pred, 1.0, None)
        torch.testing.assert_close(mean_ddim, mean_ddpm, rtol=1e-4, atol=1e-5)
        # Variance: the noise enters with the same scale, sqrt(beta-tilde_t).
        x_ddpm, _ = diffusion.ddpm_step(s, x_t, t, pred, z)
        x_ddim, _ = diffusion.ddim_step(s, x_t, t, t - 1, pred, 1.0, z)
        torch.testing.assert_close(x_ddim, x_ddpm, rtol=1e-4, atol=1e-5)
        std = ((x_ddpm - mean_ddpm) / z).mean().item()
        beta, abar, abar_prev = s.betas64[t], s.abar64[t], s.abar64[t - 1]
        assert std == pytest.approx(float(beta * (1 - abar_prev) / (1 - abar)) ** 0.5, rel=1e-3)  # Ho et al. Eq. 7
    # The last step returns the clean prediction in both.
    x_t = torch.randn((2, 3, 4, 4), generator=g) * 0.1
    pred = torch.randn((2, 3, 4, 4), generator=g)
    torch.testing.assert_close(diffusion.ddim_step(s, x_t, 0, -1, pred, 1.0, None)[0],
                               diffusion.ddpm_step(s, x_t, 0, pred, None)[0], rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_one_samples_like_ddpm_statistically():
    """Whole chains: eta=1 over all steps is DDPM (same noise, same images), and both reach the data std."""
    s = sched()
    model = GaussianOracle(s, std=0.3)
    noise = torch.randn((1000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    a = sample(model, s, noise, "ddpm", generator=torch.Generator().manual_seed(1)).images
    b = sample(model, s, noise, "ddim", steps=1000, eta=1.0, generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert a.mean().item() == pytest.approx(0.0, abs=0.03)
    assert a.std().item() == pytest.approx(0.3, rel=0.05)


class GaussianOracle(torch.nn.Module):
    """The exact eps-prediction for data ~ N(0, std^2): no training needed to test a sampler."""

    def __init__(self, s: Schedule, std: float):
        super().__init__()
        self.s, self.std = s, std

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.s.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = a.sqrt() * self.std**2 * x / (a * self.std**2 + 1 - a)  # E[x0 | x_t]
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def test_deterministic_samplers_follow_the_probability_flow_ode():
    """For Gaussian data the ODE solution is x_0 = x_T * std / sqrt(abar_T std^2 + 1 - abar_T).

    DPM-Solver++(2M) (Lu et al.) is second order, DDIM (eta 0) first order: at 50 steps the solver is far
    closer, and doubling the steps halves DDIM's error but cuts the solver's by about four.
    """
    s = sched()
    std = 0.4
    model = GaussianOracle(s, std)
    x_T = torch.randn((64, 1, 1, 1), generator=torch.Generator().manual_seed(0)) * 0.5
    aT = s.alphas_cumprod[-1]
    exact = x_T * std / (aT * std**2 + 1 - aT).sqrt()
    err = {}
    for sampler in ("ddim", "dpmpp2m"):
        for steps in (50, 100):
            out = sample(model, s, x_T, sampler, steps=steps).images
            err[(sampler, steps)] = (out - exact).abs().max().item()
    assert err[("dpmpp2m", 50)] < 0.1 * err[("ddim", 50)], err
    assert 0.35 < err[("ddim", 100)] / err[("ddim", 50)] < 0.65, err
    assert err[("dpmpp2m", 100)] / err[("dpmpp2m", 50)] < 0.45, err


def test_timestep_subsequence_is_trailing_and_descending():
    assert diffusion.timestep_subsequence(1000, None) == list(range(999, -1, -1))
    ts = diffusion.timestep_subsequence(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and all(a - b == 20 for a, b in zip(ts[:-1], ts[1:], strict=True))
    assert len(diffusion.timestep_subsequence(1000, 999)) == 999
    assert diffusion.timestep_subsequence(20, 1000) == list(range(19, -1, -1))
