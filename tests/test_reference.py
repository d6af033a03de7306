"""The diffusion math against an independent implementation: the schedulers of Hugging Face diffusers.

Settings that differ from diffusers' defaults, chosen to match what ddpmctl does (none is a bug):

- ``beta_schedule="squaredcos_cap_v2"`` is ddpmctl's "cosine" (Nichol & Dhariwal, s = 0.008, betas capped
  at 0.999 in both); ``prediction_type="v_prediction"`` is ddpmctl's "v".
- ddpmctl clips x0_hat to [-1, 1] in every sampler: ``clip_sample=True`` (DDPM, DDIM; the default) and,
  since DPMSolverMultistepScheduler has no plain clipping, ``thresholding=True, sample_max_value=1.0``
  (dynamic thresholding with its scale clamped to [1, 1] is exactly a clip to [-1, 1]).
- ddpmctl's DDIM re-derives eps from the clipped x0: ``step(..., use_clipped_model_output=True)``.
- Timesteps: ``timestep_spacing="trailing"`` (diffusers' default is "leading"); the last step goes to the
  clean image, abar = 1: ``set_alpha_to_one=True`` (DDIM) and ``final_sigmas_type="zero"`` (DPM-Solver).
- diffusers stores its schedule in float32 and forms beta_t as 1 - abar_t / abar_{t-1} in float32, which
  cancels catastrophically at small t (up to 4e-4 off in one DDPM step at t = 1, 2). ddpmctl keeps its
  schedule in float64, so single steps are compared with diffusers running on ddpmctl's float64 tables
  (which are checked against diffusers' own tables first).
"""

from __future__ import annotations

import pytest
import torch

from ddpmctl import diffusion
from ddpmctl.config import DiffusionConfig
from ddpmctl.diffusion import Schedule
from ddpmctl.sampling import sample

diffusers = pytest.importorskip("diffusers")
DDPMScheduler, DDIMScheduler = diffusers.DDPMScheduler, diffusers.DDIMScheduler
DPMSolverMultistepScheduler = diffusers.DPMSolverMultistepScheduler

SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # ddpmctl name -> diffusers beta_schedule
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}  # ddpmctl name -> diffusers prediction_type
F64 = torch.float64


def sched(schedule: str = "linear", prediction: str = "epsilon", T: int = 1000) -> Schedule:
    return Schedule(DiffusionConfig(beta_schedule=schedule, prediction_type=prediction, num_diffusion_timesteps=T))


def reference(cls, schedule: str = "linear", prediction: str = "epsilon", T: int = 1000, **kw):
    """A diffusers scheduler configured like ddpmctl (see the module docstring)."""
    return cls(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule], prediction_type=PREDICTIONS[prediction], **kw)


def on_float64_tables(scheduler, s: Schedule):
    """Let ``scheduler`` compute with ddpmctl's float64 schedule instead of its own float32 copy."""
    scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod = s.betas64, 1 - s.betas64, s.abar64
    scheduler.one = torch.tensor(1.0, dtype=F64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return scheduler


class FakeModel(torch.nn.Module):
    """A deterministic stand-in for a trained network: pred = 0.5 x + c_t, c_t a fixed random image per timestep.

    Its x0_hat is far outside [-1, 1] at large t (so the clipping matters) and mostly inside it at small t.
    """

    def __init__(self, T: int = 1000, seed: int = 0):
        super().__init__()
        self.c = 0.5 * torch.randn((T, 1, 4, 4), generator=torch.Generator().manual_seed(seed))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + self.c[t]


def diffusers_loop(scheduler, model: FakeModel, noise: torch.Tensor, **step_kw) -> torch.Tensor:
    """The usual diffusers sampling loop over ``scheduler.timesteps``."""
    x = noise.clone()
    for t in scheduler.timesteps:
        pred = model(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(pred, t, x, **step_kw).prev_sample
    return x


def x_T(seed: int = 5) -> torch.Tensor:
    return torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_beta_schedules_match_diffusers(schedule, T):
    """Same betas and abar (to float32 precision), and the cosine cap of 0.999 lands on the same, last timestep.

    diffusers holds the capped beta as float32(0.999) = 0.99900001, so its last 1 - beta (hence abar_{T-1})
    is 1.3e-5 smaller relative to ddpmctl's float64 0.001: the one looser comparison.
    """
    s = sched(schedule, T=T)
    ref = reference(DDPMScheduler, schedule, T=T)
    torch.testing.assert_close(s.betas64, ref.betas.to(F64), rtol=2e-7, atol=0)
    torch.testing.assert_close(s.betas, ref.betas, rtol=2e-7, atol=0)  # the float32 tables used in training
    torch.testing.assert_close(s.abar64[:-1], ref.alphas_cumprod[:-1].to(F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.alphas_cumprod[:-1], ref.alphas_cumprod[:-1], rtol=1e-6, atol=0)
    last_rtol = 2e-5 if schedule == "cosine" else 1e-6
    assert s.abar64[-1].item() == pytest.approx(ref.alphas_cumprod[-1].item(), rel=last_rtol, abs=0)
    if schedule == "cosine":
        capped = (s.betas64 >= 0.999 - 1e-12).nonzero().flatten().tolist()
        assert capped == (ref.betas >= 0.999 - 1e-6).nonzero().flatten().tolist() == [T - 1]
        assert s.betas64[-1].item() == 0.999


def test_timestep_subsequence_is_diffusers_trailing_spacing():
    """timestep_subsequence is diffusers' "trailing" spacing (Lin et al. 2024, Table 2) for every step count,
    including those where T/n puts a timestep half-way between two integers: n = 16 gives 999, 937, 874, 811
    (rounding T-1 - i T/n would give 936 and 812), n = 48 gives 999, 978, 957, 936 (numpy's arange lands just
    below 937.5). diffusers' np.arange with a float step also returns n + 1 timesteps, the last one -1, for
    some n (e.g. 62 for n = 61): those n are skipped; ddpmctl always returns n.
    """
    T = 1000
    ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    compared = 0
    for n in range(1, T + 1):
        ddim.set_timesteps(n)
        ours = diffusion.timestep_subsequence(T, n)
        assert len(ours) == n and ours[0] == T - 1 and ours[-1] >= 0, n
        if len(ddim.timesteps) == n:
            assert ours == ddim.timesteps.tolist(), n
            compared += 1
    assert compared > 900


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_process_and_v_target_match_diffusers(schedule, prediction):
    """q_sample is add_noise (Ho et al. Eq. 4) and the v target is get_velocity (Salimans & Ho 2022).

    Against diffusers on ddpmctl's float64 tables (float64 inputs) they agree to 1e-6; stock diffusers forms
    sqrt(1 - abar_t) from float32 abar, 1e-4 relative off at t = 0, 1 (up to 7e-6 absolute here): 2e-5.
    """
    s, stock = sched(schedule, prediction), reference(DDPMScheduler, schedule, prediction)
    ref = on_float64_tables(reference(DDPMScheduler, schedule, prediction), s)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((8, 3, 4, 4), generator=g) * 2 - 1
    eps = torch.randn((8, 3, 4, 4), generator=g)
    t = torch.tensor([0, 1, 2, 10, 250, 500, 998, 999])
    x_t, target = diffusion.q_sample(s, x0, t, eps), diffusion.training_target(s, x0, t, eps)
    torch.testing.assert_close(x_t.to(F64), ref.add_noise(x0.to(F64), eps.to(F64), t), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_t, stock.add_noise(x0, eps, t), rtol=0, atol=2e-5)
    if prediction == "epsilon":
        assert torch.equal(target, eps)
    else:
        torch.testing.assert_close(target.to(F64), ref.get_velocity(x0.to(F64), eps.to(F64), t), rtol=0, atol=1e-6)
        torch.testing.assert_close(target, stock.get_velocity(x0, eps, t), rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_split_prediction_matches_diffusers(schedule, prediction):
    """x0_hat from eps or v (per-sample timesteps, float32 tables; and the samplers' one-timestep float64 path)
    is diffusers' pred_original_sample without clipping, on float64 inputs and ddpmctl's float64 tables.

    ddpmctl casts pred to float32, so x0_hat carries float32 rounding, which eps-prediction amplifies by
    1 / sqrt(abar_t) (157 at t = 999 linear, 2e4 cosine): the tolerance scales with it. With v, eps_hat recovers the noise
    of a target built by diffusers' get_velocity.
    """
    s = sched(schedule, prediction)
    ref = on_float64_tables(reference(DDPMScheduler, schedule, prediction, clip_sample=False), s)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 10, 250, 500, 900, 999])
    x_t = torch.randn((len(t), 3, 4, 4), generator=g)
    pred = torch.randn((len(t), 3, 4, 4), generator=g)
    x0, _ = diffusion.split_prediction(s, x_t, t, pred)
    for i, ti in enumerate(t.tolist()):
        x0_ref = ref.step(pred[i: i + 1].to(F64), ti, x_t[i: i + 1].to(F64)).pred_original_sample
        amplify = 1.0 if prediction == "v" else 1 / s.abar64[ti].sqrt().item()
        torch.testing.assert_close(x0[i: i + 1].to(F64), x0_ref, rtol=1e-6, atol=1e-6 * amplify)
        x0_scalar, _ = diffusion._split_scalar(s, x_t[i: i + 1], ti, pred[i: i + 1])  # what the samplers use
        torch.testing.assert_close(x0_scalar.to(F64), x0_ref, rtol=1e-6, atol=1e-6 * amplify)
    if prediction == "v":
        x0_true = torch.rand((len(t), 3, 4, 4), generator=g) * 2 - 1
        eps_true = torch.randn((len(t), 3, 4, 4), generator=g)
        v = ref.get_velocity(x0_true.to(F64), eps_true.to(F64), t).float()
        x0_hat, eps_hat = diffusion.split_prediction(s, diffusion.q_sample(s, x0_true, t, eps_true), t, v)
        torch.testing.assert_close(x0_hat, x0_true, rtol=0, atol=1e-5)
        torch.testing.assert_close(eps_hat, eps_true, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_step_matches_diffusers(schedule, prediction):
    """One ancestral step (Ho et al. Eq. 6-7, sigma^2 = beta-tilde) is DDPMScheduler.step with
    variance_type="fixed_small" and clip_sample=True, given the same noise z (drawn from the same seed).

    On float64 inputs the two agree to 1e-7 (x0_hat to 1e-5: ddpmctl casts pred to float32, and
    1 / sqrt(abar_t) amplifies that rounding); ddpmctl's float32 step is within 1e-5 of the float64
    reference. Stock diffusers (float32 tables) is up to 4e-4 off at t = 1, 2 (see the module docstring):
    that error is diffusers', which is why the reference runs on float64 tables.
    """
    s = sched(schedule, prediction)
    ref = on_float64_tables(reference(DDPMScheduler, schedule, prediction, variance_type="fixed_small",
                                      clip_sample=True), s)
    g = torch.Generator().manual_seed(2)
    for t in (999, 998, 900, 500, 100, 10, 2, 1, 0):
        x = torch.randn((4, 3, 4, 4), generator=g) * (1.0 if t > 500 else 0.7)
        pred = torch.randn((4, 3, 4, 4), generator=g)
        z64 = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=F64)  # what diffusers draws
        out = ref.step(pred.to(F64), t, x.to(F64), generator=torch.Generator().manual_seed(t))
        x_prev64, x0_64 = diffusion.ddpm_step(s, x.to(F64), t, pred.to(F64), z64)
        torch.testing.assert_close(x_prev64, out.prev_sample, rtol=0, atol=1e-7)
        torch.testing.assert_close(x0_64.to(F64), out.pred_original_sample, rtol=0, atol=1e-5)
        assert x0_64.abs().max() <= 1  # clipped
        x_prev, x0 = diffusion.ddpm_step(s, x, t, pred, z64.float())
        torch.testing.assert_close(x_prev.to(F64), out.prev_sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(x0.to(F64), out.pred_original_sample, rtol=0, atol=1e-5)
        if t > 0:  # the noise enters with the same scale: sqrt(beta-tilde_t)
            mean, _ = diffusion.ddpm_step(s, x.to(F64), t, pred.to(F64), None)
            std = ((x_prev64 - mean) / z64).mean().item()
            assert std == pytest.approx(ref._get_variance(t).sqrt().item(), rel=1e-6)


@pytest.mark.parametrize(("schedule", "prediction"), [("linear", "epsilon"), ("cosine", "v")])
def test_ddpm_sampling_loop_matches_diffusers(schedule, prediction):
    """sample("ddpm") over all 1000 timesteps is diffusers' DDPM loop, noise drawn from the same generator
    (both draw one randn per step for t > 0, in the same order). diffusers runs on ddpmctl's float64 tables."""
    s = sched(schedule, prediction)
    ref = on_float64_tables(reference(DDPMScheduler, schedule, prediction, clip_sample=True), s)
    model, noise = FakeModel(), x_T()
    ours = sample(model, s, noise, "ddpm", generator=torch.Generator().manual_seed(7)).images
    theirs = diffusers_loop(ref, model, noise, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_loop_matches_diffusers(schedule, prediction, steps):
    """sample("ddim", eta=0) is DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True,
    clip_sample=True) stepped with use_clipped_model_output=True, on diffusers' own float32 tables.

    Only step counts that divide T: DDIMScheduler.step goes to t - T // n, not to the next timestep of its
    own trailing list (n = 30: it visits 966 then 932 but steps 966 -> 933); ddpmctl steps to the next one.
    """
    s = sched(schedule, prediction)
    ref = reference(DDIMScheduler, schedule, prediction, clip_sample=True, set_alpha_to_one=True,
                    timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == diffusion.timestep_subsequence(1000, steps)
    model, noise = FakeModel(), x_T()
    ours = sample(model, s, noise, "ddim", steps=steps).images
    theirs = diffusers_loop(ref, model, noise, eta=0.0, use_clipped_model_output=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # Without re-deriving eps from the clipped x0 the loops part (why use_clipped_model_output is set).
    ref.set_timesteps(steps)
    assert (ours - diffusers_loop(ref, model, noise, eta=0.0)).abs().max() > 0.01


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_stochastic_step_and_loop_match_diffusers(schedule, eta):
    """eta > 0 (Song et al. Eq. 12, 16): single steps given the same noise, and whole 50-step loops driven by
    the same generator (diffusers also draws noise on the last step, where sigma = 0: it changes nothing).
    Single steps use diffusers on ddpmctl's float64 tables, the loops its own float32 ones."""
    s = sched(schedule)
    ref = reference(DDIMScheduler, schedule, clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(50)
    ref64 = on_float64_tables(reference(DDIMScheduler, schedule, clip_sample=True, set_alpha_to_one=True,
                                        timestep_spacing="trailing"), s)
    ref64.set_timesteps(50)
    g = torch.Generator().manual_seed(3)
    ts = ref.timesteps.tolist()
    for i in (0, 1, 25, 48, 49):
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        x, pred, z = (torch.randn((4, 3, 4, 4), generator=g) for _ in range(3))
        out = ref64.step(pred, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
        x_prev, x0 = diffusion.ddim_step(s, x, t, t_prev, pred, eta, z if t_prev >= 0 else None)
        torch.testing.assert_close(x_prev, out.prev_sample, rtol=0, atol=2e-6)
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=0, atol=2e-6)
    model, noise = FakeModel(), x_T()
    ours = sample(model, s, noise, "ddim", steps=50, eta=eta, generator=torch.Generator().manual_seed(9)).images
    theirs = diffusers_loop(ref, model, noise, eta=eta, use_clipped_model_output=True,
                            generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta_one_on_uneven_timesteps_is_respaced_ddpm(schedule):
    """DDIM with eta = 1 is DDPM on the subsequence (Song et al. Sec. 4.1, Nichol & Dhariwal's respacing):
    30 steps (strides of 33 and 34) against DDPMScheduler given ddpmctl's timesteps, which steps to the next
    listed timestep with beta_t = 1 - abar_t / abar_prev. Same generator; diffusers on float64 tables."""
    s = sched(schedule)
    ts = diffusion.timestep_subsequence(1000, 30)
    assert {a - b for a, b in zip(ts[:-1], ts[1:], strict=True)} == {33, 34}
    ref = on_float64_tables(reference(DDPMScheduler, schedule, clip_sample=True), s)
    ref.set_timesteps(timesteps=ts)
    model, noise = FakeModel(), x_T()
    ours = sample(model, s, noise, "ddim", steps=30, eta=1.0, generator=torch.Generator().manual_seed(4)).images
    theirs = diffusers_loop(ref, model, noise, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), rtol=0, atol=1e-5)


def dpm_reference(schedule: str, prediction: str, steps: int, clip: bool) -> DPMSolverMultistepScheduler:
    ref = reference(DPMSolverMultistepScheduler, schedule, prediction, algorithm_type="dpmsolver++", solver_order=2,
                    solver_type="midpoint", timestep_spacing="trailing", final_sigmas_type="zero",
                    lower_order_final=True, thresholding=clip, sample_max_value=1.0)
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == diffusion.timestep_subsequence(1000, steps)
    return ref


@pytest.mark.parametrize("steps", [10, 30, 50])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_loop_matches_diffusers(schedule, prediction, steps):
    """sample("dpmpp2m") is DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", timestep_spacing="trailing", final_sigmas_type="zero") with x0 clipped to
    [-1, 1] (thresholding=True, sample_max_value=1.0). Both take a first-order first step, and the last
    step (to sigma = 0) returns x0_hat in both (final_sigmas_type="zero" makes diffusers' last step first
    order whatever lower_order_final says). diffusers computes in float32 (its sigmas and the sample)."""
    s = sched(schedule, prediction)
    model, noise = FakeModel(), x_T()
    ours = sample(model, s, noise, "dpmpp2m", steps=steps).images
    theirs = diffusers_loop(dpm_reference(schedule, prediction, steps, clip=True), model, noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpmpp_2m_step_without_clipping_matches_diffusers(schedule):
    """dpmpp_2m_step alone (Lu et al. 2022, Alg. 2), fed unclipped x0_hat, against diffusers without
    thresholding: the solver formula itself, apart from ddpmctl's clipping in the sampler. v-prediction keeps
    the unclipped x0_hat = sqrt(abar) x - sqrt(1 - abar) v of order 1 (eps-prediction divides by sqrt(abar_T))."""
    s, steps = sched(schedule, "v"), 25
    ref = dpm_reference(schedule, "v", steps, clip=False)
    model, noise = FakeModel(), x_T()
    x, last, ts, x0_max = noise.clone(), (None, None), diffusion.timestep_subsequence(1000, steps), 0.0
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t)
        x0, _ = diffusion.split_prediction(s, x, tt, model(x, tt))
        x0_max = max(x0_max, x0.abs().max().item())
        x, last = diffusion.dpmpp_2m_step(s, x, t, t_prev, x0, *last), (x0, t)
    assert x0_max > 1.5  # clipping would have changed this run
    torch.testing.assert_close(x, diffusers_loop(ref, model, noise), rtol=0, atol=1e-5)
