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


# ----------------------------------------------------------------------------- Min-SNR-gamma and EDM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_min_snr_weighted_loss_is_the_papers_x0_loss_times_min_snr_gamma(prediction_type):
    """Hang et al. 2023, Eq. 6-7: the weighted loss equals min(SNR_t, gamma) ||x_0 - x0_hat||^2, whatever the
    network predicts (the v weight is min(SNR, gamma) / (SNR + 1), not / SNR)."""
    s, gamma = sched(prediction_type=prediction_type), 5.0
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((5, 3, 4, 4), generator=g), torch.randn((5, 3, 4, 4), generator=g)
    t = torch.tensor([0, 50, 200, 600, 999])
    x_t = diffusion.q_sample(s, x0, t, eps)
    target = diffusion.training_target(s, x0, t, eps)
    pred = target + 0.1 * torch.randn(target.shape, generator=g)  # an imperfect network
    x0_hat, _ = diffusion.split_prediction(s, x_t, t, pred)
    weighted = diffusion.min_snr_weight(s, t, gamma) * (pred - target).square().flatten(1).mean(1)
    abar = s.alphas_cumprod[t]
    snr = abar / (1 - abar)
    paper = snr.clamp(max=gamma) * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(weighted, paper, rtol=1e-3, atol=1e-6)


def test_min_snr_weights_by_hand():
    s = sched()  # linear schedule: abar_0 = 1 - 1e-4 (SNR 9999), abar_999 = 4.04e-5
    w = diffusion.min_snr_weight(s, torch.tensor([0, 999]), 5.0)
    assert w[0].item() == pytest.approx(5.0 / 9999.0, rel=1e-3)  # clipped: gamma / SNR
    assert w[1].item() == pytest.approx(1.0, rel=1e-6)  # SNR below gamma: weight 1 for epsilon
    v = diffusion.min_snr_weight(sched(prediction_type="v"), torch.tensor([0, 999]), 5.0)
    assert v[0].item() == pytest.approx(5.0 / 10000.0, rel=1e-3)
    snr = 4.04e-5 / (1 - 4.04e-5)
    assert v[1].item() == pytest.approx(snr / (snr + 1), rel=0.02)


def test_edm_preconditioning_by_hand():
    """Karras et al. 2022, Table 1, at sigma = sigma_data = 0.5: c_skip 1/2, c_out 0.25/sqrt(0.5), c_in sqrt(2)."""
    c_skip, c_out, c_in, c_noise = diffusion.edm_coefficients(torch.tensor([0.5, 80.0]))
    assert c_skip[0].item() == pytest.approx(0.5) and c_out[0].item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in[0].item() == pytest.approx(math.sqrt(2)) and c_noise[0].item() == pytest.approx(math.log(0.5) / 4)
    assert c_skip[1].item() == pytest.approx(0.25 / 6400.25) and c_in[1].item() == pytest.approx(1 / math.sqrt(6400.25))


def test_edm_effective_target_is_the_weighted_denoiser_loss():
    """||F - target||^2 = lambda(sigma) ||D - x_0||^2 with lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.rand((4, 3, 4, 4), generator=g) * 2 - 1, torch.randn((4, 3, 4, 4), generator=g)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    inputs, c_noise, target = diffusion.edm_training_example(x0, noise, sigma)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    c_skip, c_out, c_in, _ = diffusion.edm_coefficients(sigma)
    torch.testing.assert_close(inputs, c_in.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    f = torch.randn(x0.shape, generator=g)
    d = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * f
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close((f - target).square().flatten(1).sum(1), lam * (d - x0).square().flatten(1).sum(1),
                               rtol=1e-4, atol=1e-4)
    log_sigma = diffusion.edm_training_sigmas(torch.tensor([0.0, 1.0])).log()
    torch.testing.assert_close(log_sigma, torch.tensor([-1.2, 0.0]))  # ln sigma ~ N(-1.2, 1.2^2)


def test_edm_schedule_is_the_karras_grid_as_abar():
    s = sched(formulation="edm", num_diffusion_timesteps=18)
    sig = diffusion.karras_sigmas(18)
    assert sig[0].item() == pytest.approx(0.002) and sig[-1].item() == pytest.approx(80.0)
    mid = (0.002 ** (1 / 7) + 0.5 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7  # Eq. 5 half-way
    assert diffusion.karras_sigmas(3)[1].item() == pytest.approx(mid)
    torch.testing.assert_close(s.sigmas.double(), sig, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.alphas_cumprod.double(), 1 / (1 + sig**2), rtol=1e-5, atol=0)
    assert s.prediction_type == "sample"


def test_heun_step_is_karras_algorithm_1_on_a_gaussian():
    """For data ~ N(0, s^2) the ideal denoiser is D(x; sigma) = x s^2 / (s^2 + sigma^2); one step of ddpmctl's
    Heun (in x_t scaling) equals Algorithm 1 written out in sigma space, and many steps reach the exact ODE
    solution x(sigma) = x_i sqrt((s^2 + sigma^2) / (s^2 + sigma_i^2))."""
    s = sched(formulation="edm", num_diffusion_timesteps=200)
    var = 0.25

    def d_ve(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * var / (var + sigma**2)

    def sigma_of(t: int) -> float:
        return float(s.sigmas[t])

    def a_of(t: int) -> float:
        return float(s.sqrt_abar[t])

    x_ve = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(3)) * 10
    t, t_prev = 150, 120
    def denoise_at(tn: int):  # D at timestep tn, taking x in x_t scaling
        return lambda xp: d_ve(xp / a_of(tn), sigma_of(tn))

    x_t = x_ve * a_of(t)
    out = diffusion.heun_step(s, x_t, t, t_prev, d_ve(x_ve, sigma_of(t)), denoise_at(t_prev))
    # Algorithm 1, lines 4-8, in sigma space
    si, sn = sigma_of(t), sigma_of(t_prev)
    d = (x_ve - d_ve(x_ve, si)) / si
    x_next = x_ve + (sn - si) * d
    d2 = (x_next - d_ve(x_next, sn)) / sn
    expected = x_ve + (sn - si) * (d + d2) / 2
    torch.testing.assert_close(out / a_of(t_prev), expected, rtol=1e-5, atol=1e-5)
    # many steps: the exact solution of the probability-flow ODE
    x, steps = x_t, list(range(199, 0, -1))
    for i, tc in enumerate(steps[:-1]):
        tn = steps[i + 1]
        x = diffusion.heun_step(s, x, tc, tn, d_ve(x / a_of(tc), sigma_of(tc)), denoise_at(tn))
    x0 = x / a_of(steps[-1])
    exact = (x_t / a_of(199)) * math.sqrt((var + sigma_of(steps[-1]) ** 2) / (var + sigma_of(199) ** 2))
    torch.testing.assert_close(x0, exact, rtol=1e-3, atol=1e-3)
    assert torch.equal(diffusion.heun_step(s, x_t, t, -1, x_ve, lambda _x: 1 / 0), x_ve)  # last step: Euler to D


def test_heun_sampler_runs_on_ddpm_and_edm_schedules():
    from ddpmctl.sampling import EDMDenoiser, sampling_network

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - predicts eps = 0 (ddpm), or F = 0 (edm)
    for s in (sched(), sched(formulation="edm")):
        net = sampling_network(zero, s) if s.formulation == "edm" else zero
        out = sample(net, s, noise, sampler="heun", steps=5)
        assert out.images.shape == noise.shape and torch.isfinite(out.images).all()
    edm = sched(formulation="edm")
    wrapped = EDMDenoiser(lambda x, c: torch.zeros_like(x), edm)
    t = torch.tensor([500, 999])
    c_skip = diffusion.edm_coefficients(edm.sigmas[t])[0].view(-1, 1, 1, 1)
    x_t = noise
    torch.testing.assert_close(wrapped(x_t, t), c_skip * x_t * (1 + edm.sigmas[t] ** 2).sqrt().view(-1, 1, 1, 1))
