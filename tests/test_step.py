"""The shared training step, low-precision GroupNorm and the CUDA-graph switches (their CPU-visible parts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpmctl import sampling
from ddpmctl.config import DiffusionConfig, ModelConfig
from ddpmctl.diffusion import Schedule
from ddpmctl.model import GroupNorm, UNet, set_low_precision_norms
from ddpmctl.runtime import Precision
from ddpmctl.state import EMA
from ddpmctl.step import TrainStep, graph_blocker, make_optimizer

TINY = ModelConfig(img_size=8, starting_channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0)


def _step(model: UNet, optimizer: torch.optim.Optimizer | None = None, **kw) -> TrainStep:
    """A CPU fp32 step with a constant learning rate; AdamW unfused unless ``optimizer`` says otherwise."""
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    sched = Schedule(DiffusionConfig(num_diffusion_timesteps=20))
    return TrainStep(model, model, sched, Precision("fp32", None, "cpu"), opt, lr, torch.device("cpu"), **kw)


def test_graph_blockers_name_the_reason():
    cuda, bf16, fp16 = torch.device("cuda"), Precision("bf16", torch.bfloat16, "cuda"), Precision("fp16", torch.float16, "cuda")
    assert graph_blocker(cuda, bf16, 1, False) is None
    assert "CUDA" in graph_blocker(torch.device("cpu"), bf16, 1, False)
    assert "loss scaling" in graph_blocker(cuda, fp16, 1, False)
    assert "accumulation" in graph_blocker(cuda, bf16, 2, False)
    assert "torchrun" in graph_blocker(cuda, bf16, 1, True)
    assert "checkpointing" in graph_blocker(cuda, bf16, 1, False, checkpointing=True)


def test_gradient_checkpointing_skips_the_cuda_graph_with_a_note():
    """Its recomputation saves and restores RNG state, which graph capture forbids: the step runs eagerly."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), fused=True)  # built, never run: no CUDA needed
    sched = Schedule(DiffusionConfig(num_diffusion_timesteps=20))
    cuda, bf16 = torch.device("cuda"), Precision("bf16", torch.bfloat16, "cuda")
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    plain = TrainStep(model, model, sched, bf16, opt, lr, cuda, cuda_graph=True)
    assert plain.use_graph and plain.graph_note is None
    step = TrainStep(model, model, sched, bf16, opt, lr, cuda, cuda_graph=True, checkpointing=True)
    assert not step.use_graph and "--gradient-checkpointing" in step.graph_note and "CUDA graph" in step.graph_note


def test_step_on_cpu_stays_eager_and_matches_a_hand_written_step():
    torch.manual_seed(0)
    model = UNet(TINY)
    ref = UNet(TINY)
    ref.load_state_dict(model.state_dict())
    step = _step(model, random_flip=False, cuda_graph=True, max_grad_norm=1.0)
    assert not step.use_graph  # asked for, but there is no CUDA device
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)

    torch.manual_seed(1)
    loss, grad_norm, check = step.forward_backward([batch])
    torch.manual_seed(1)
    x0 = batch.float() / 127.5 - 1
    t = torch.randint(0, 20, (4,))
    noise = torch.randn_like(x0)
    s = Schedule(DiffusionConfig(num_diffusion_timesteps=20))
    x_t = s.sqrt_abar[t].view(-1, 1, 1, 1) * x0 + s.sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise
    ref_loss = F.mse_loss(ref(x_t, t), noise)
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(grad_norm, ref_norm)
    assert torch.isfinite(check)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_accumulated_micro_batches_average_their_losses():
    torch.manual_seed(0)
    step = _step(UNet(TINY), accumulation=2)
    a, b = (torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8) for _ in range(2))
    torch.manual_seed(3)
    loss, _, _ = step.forward_backward([a, b])
    step.zero_grad()
    torch.manual_seed(3)
    la = step.micro_batch(a, accumulating=True)
    lb = step.micro_batch(b)
    torch.testing.assert_close(loss, (la + lb) / 2)


def test_a_step_updates_weights_schedule_and_ema_and_drops_gradients():
    torch.manual_seed(0)
    model = UNet(TINY)
    ema = EMA(model, 0.999)
    step = _step(model, ema=ema)
    before = [p.detach().clone() for p in model.parameters()]
    result = step.step([torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)])
    assert result.skipped.item() == 0.0 and torch.isfinite(result.loss)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert step.scheduler.last_epoch == 1 and ema.num_updates == 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW (CUDA, CPU)", "unfused AdamW (MPS)"])
def test_a_non_finite_step_changes_no_weight_yet_counts_on_every_device(fused, monkeypatch):
    """One rule everywhere: the update is skipped, the step counts (LR schedule and EMA move on)."""
    from ddpmctl import diffusion

    torch.manual_seed(0)
    model = UNet(TINY)
    ema = EMA(model, 0.999)
    opt = make_optimizer(model.parameters(), 1e-3, 0.0, torch.device("cpu")) if fused else None
    step = _step(model, optimizer=opt, ema=ema)
    assert step.skip_on_device == fused
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    step.step([batch])  # a good step first: the optimizer has state to keep
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in step.optimizer.state.values()]
    counts = [float(s["step"]) for s in step.optimizer.state.values()]
    real = diffusion.loss_fn
    monkeypatch.setattr(diffusion, "loss_fn", lambda *a, **k: real(*a, **k) * float("nan"))
    result = step.step([batch])
    assert result.skipped.item() == 1.0
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters(), strict=True))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, step.optimizer.state.values(), strict=True))
    assert [float(s["step"]) for s in step.optimizer.state.values()] == counts
    assert step.scheduler.last_epoch == 2 and ema.num_updates == 2
    assert all(p.grad is None for p in model.parameters())


def test_low_precision_group_norm_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, 5, 5)
    norm.low_precision = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())  # what a convolution under autocast hands on
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.bfloat16(), 4, norm.weight.bfloat16(), norm.bias.bfloat16(), 1e-6)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))  # fp32 stays fp32


def test_set_low_precision_norms_reaches_every_norm_and_keeps_the_weights():
    model = UNet(TINY)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_low_precision_norms(model, True)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.low_precision for m in norms)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_sampling_graphs_only_for_deterministic_loops_on_cuda():
    eligible = sampling.SamplingGraphs.eligible
    cuda = torch.device("cuda")
    assert eligible(cuda, "ddim", 0.0, False) and eligible(cuda, "dpmpp2m", 0.0, False)
    assert not eligible(cuda, "ddim", 0.5, False)  # fresh noise each step
    assert not eligible(cuda, "ddpm", 0.0, False)
    assert not eligible(cuda, "ddim", 0.0, True)  # recording frames reads x_t back each step
    assert not eligible(torch.device("cpu"), "ddim", 0.0, False)


def test_sample_with_graphs_on_the_cpu_is_the_eager_loop():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    sched = Schedule(DiffusionConfig(num_diffusion_timesteps=20))
    noise = torch.randn(2, 3, 8, 8)
    graphs = sampling.SamplingGraphs()
    a = sampling.sample(model, sched, noise, sampler="ddim", steps=5, graphs=graphs).images
    b = sampling.sample(model, sched, noise, sampler="ddim", steps=5).images
    assert torch.equal(a, b) and graphs.graph is None and graphs.failed is None


def test_padded_rows_count_for_nothing():
    """The CUDA graph's fixed batch: an epoch's short last batch fills the first rows; the rest must not count."""
    torch.manual_seed(0)
    model = UNet(TINY)
    step = _step(model, random_flip=False)
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)

    def grads(b: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        step.zero_grad(force=True)
        torch.manual_seed(5)
        loss = step.micro_batch(b, rows=rows)
        return loss, [p.grad.clone() for p in step.params]

    full_loss, full = grads(batch, None)
    all_loss, all_rows = grads(batch, torch.tensor(4.0))  # every row real: the plain mean, to rounding
    torch.testing.assert_close(all_loss, full_loss)
    for a, b in zip(all_rows, full, strict=True):
        torch.testing.assert_close(a, b)

    loss, first = grads(batch, torch.tensor(3.0))
    other = batch.clone()
    other[3] = 255 - other[3]  # a different image in the unused row
    loss2, second = grads(other, torch.tensor(3.0))
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


class _RowwiseTorch:
    """The step module's ``torch`` with each image's timestep and noise a function of its own pixels,
    so a batch and the same images padded with more rows draw the same values for the real rows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, device=None, **kwargs):
        return torch.arange(size[0], device=device) * 7 % high

    def randn_like(self, x, **kwargs):
        return torch.sin(x * 13.0 + 1.0)


def test_a_padded_short_batch_matches_the_plain_mean_over_its_images(monkeypatch):
    from ddpmctl import step as step_mod

    monkeypatch.setattr(step_mod, "torch", _RowwiseTorch())
    torch.manual_seed(0)
    model = UNet(TINY)
    step = _step(model, random_flip=False)
    short = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    padded = torch.cat([short, torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)])

    step.zero_grad(force=True)
    plain = step.micro_batch(short)
    plain_grads = [p.grad.clone() for p in step.params]
    step.zero_grad(force=True)
    masked = step.micro_batch(padded, rows=torch.tensor(3.0))
    torch.testing.assert_close(masked, plain)
    for p, g in zip(step.params, plain_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_a_training_step_with_gradient_checkpointing_updates_the_weights_as_without():
    from ddpmctl.config import Config, apply_overrides
    from ddpmctl.parts import build_parts

    base = apply_overrides(Config(), {"img_size": 8, "starting_channels": 8, "channel_multipliers": "1,2",
                                      "attention_resolutions": "4", "num_heads": 2, "dropout": 0.1,
                                      "num_diffusion_timesteps": 20, "device": "cpu", "warmup_steps": 1})
    batch = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    after = {}
    for on in (False, True):
        parts = build_parts(apply_overrides(base, {"gradient_checkpointing": on}), torch.device("cpu"),
                            Precision("fp32", None, "cpu"))
        assert parts.model.gradient_checkpointing is on
        torch.manual_seed(3)
        results = [parts.step.step([batch]) for _ in range(2)]
        weights = [p.detach().clone() for p in parts.model.parameters()]
        after[on] = ([(r.loss.item(), r.grad_norm.item()) for r in results], weights)
    assert after[True][0] == after[False][0]  # bit for bit: dropout's RNG is replayed in the recomputation
    assert all(torch.equal(a, b) for a, b in zip(after[True][1], after[False][1], strict=True))


def test_mps_pads_a_short_batch_to_one_shape_with_the_plain_loss_and_gradients(monkeypatch):
    """fixed_shape (MPS): an epoch's short last batch is padded to the batch size, so the device sees one input
    shape all run (each new shape grows MPS's driver memory), and the padding counts for nothing."""
    from ddpmctl import step as step_mod

    monkeypatch.setattr(step_mod, "torch", _RowwiseTorch())
    torch.manual_seed(0)
    model = UNet(TINY)
    full, short = (torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8) for n in (4, 3))
    results = {}
    for fixed in (False, True):
        step = _step(model, random_flip=False, accumulation=2, graph_batch=4, fixed_shape=fixed)
        shapes: list[int] = []
        hook = model.register_forward_pre_hook(lambda _m, args, seen=shapes: seen.append(args[0].shape[0]))
        step.zero_grad(force=True)
        loss, grad_norm, _ = step.forward_backward([full, short])
        hook.remove()
        results[fixed] = (loss, grad_norm, [p.grad.clone() for p in step.params], shapes)
    (loss, norm, grads, shapes), (loss_f, norm_f, grads_f, shapes_f) = results[False], results[True]
    assert shapes == [4, 3] and shapes_f == [4, 4]
    torch.testing.assert_close(loss_f, loss)
    torch.testing.assert_close(norm_f, norm)
    for a, b in zip(grads_f, grads, strict=True):
        torch.testing.assert_close(a, b)


def test_resuming_keeps_this_runs_optimizer_implementation():
    from ddpmctl.step import load_optimizer_state

    model = UNet(TINY)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)  # unfused, as older ddpmctl saved on the CPU
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    fused = make_optimizer(model.parameters(), 1e-3, 0.0, torch.device("cpu"))
    load_optimizer_state(fused, old.state_dict())
    assert all(g["fused"] for g in fused.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].item() == 1 for s in fused.state.values())
    fused.found_inf = torch.zeros(())  # the device-side skip works after the load (it needs the fused kernel)
    fused.step()
    assert all(s["step"].item() == 2 for s in fused.state.values())

    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)  # and the other way (an MPS run resuming a CPU one)
    load_optimizer_state(plain, fused.state_dict())
    assert not any(g["fused"] for g in plain.param_groups)
    plain.step()


# ----------------------------------------------------------------------------- GradSync (torchrun + CUDA graph)


def _grad_sync_rank(rank: int, world: int, store: str) -> None:
    """One gloo rank: three steps through DDP and through GradSync from the same start must agree."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ddpmctl.gradsync import GradSync

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        a, b = UNet(TINY), UNet(TINY)
        b.load_state_dict(a.state_dict())
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
        if rank == 1:  # a rank that starts elsewhere is brought to rank 0's weights by both
            with torch.no_grad():
                for p in [*a.parameters(), *b.parameters()]:
                    p.add_(1.0)
        ddp = DistributedDataParallel(a)
        sync = GradSync(list(b.parameters()))
        assert all(v.stride() == p.stride() for v, p in zip(sync.views, b.parameters(), strict=True))
        assert any(p.dim() == 4 and not p.is_contiguous() for p in b.parameters())  # channels_last weights
        sync.broadcast_from_rank0(b)
        cpu = torch.device("cpu")  # fused AdamW, as trained
        step_a = _step(a, make_optimizer(a.parameters(), 1e-3, 0.0, cpu), random_flip=False, channels_last=True)
        step_a.train_model, step_a.ddp = ddp, ddp
        step_b = _step(b, make_optimizer(b.parameters(), 1e-3, 0.0, cpu), random_flip=False, grad_sync=sync,
                       channels_last=True)
        data = torch.Generator().manual_seed(rank)
        for i in range(3):
            batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=data)  # each rank its own
            out = {}
            for name, step in (("a", step_a), ("b", step_b)):
                torch.manual_seed(100 * i + rank)
                out[name] = step.step([batch])
                if i == 1:  # as the graph's warm-up does: dropped gradients, GradSync must re-attach its views
                    step.zero_grad(force=True)
            torch.testing.assert_close(out["b"].grad_norm, out["a"].grad_norm, rtol=1e-5, atol=1e-6)  # averaged, then clipped
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        total = torch.stack([p.detach().double().sum() for p in b.parameters()]).sum().reshape(1)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, total)
        assert gathered[0].item() == gathered[1].item()  # the ranks hold identical weights
        del ddp, step_a  # DDP's reducer goes before its process group
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_grad_sync_trains_as_distributed_data_parallel(tmp_path):
    """The torchrun path of the CUDA graph (all-reduce after the replay) against DDP, on two gloo processes."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    mp.spawn(_grad_sync_rank, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def test_ema_half_life_spans_the_same_images_whatever_the_batch():
    """Karras et al.: decay per update 0.5 ** (batch / half-life); after the ramp-up, the weight of the images
    seen so far halves every half-life of images, at batch 4 or 16 alike."""
    model = UNet(TINY)
    small, big = (EMA(model, 0.9999, warmup=False, halflife_images=1000, images_per_update=b) for b in (4, 16))
    assert small.current_decay() ** 250 == pytest.approx(0.5) and big.current_decay() ** 62.5 == pytest.approx(0.5)
    ramped = EMA(model, 0.9999, warmup=True, halflife_images=1000, images_per_update=10)
    assert ramped.current_decay() == 0.0  # nothing seen yet: the average is the weights
    ramped.num_updates = 100  # 1,000 images seen: half-life min(1000, 5% of them) = 50 images
    assert ramped.current_decay() == pytest.approx(0.5 ** (10 / 50))


@pytest.mark.parametrize("formulation", ["ddpm", "edm"])
def test_min_snr_and_edm_steps_train(formulation):
    """The step with each objective: finite loss, an update, the expected network input."""
    torch.manual_seed(0)
    model = UNet(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    cfg = DiffusionConfig(num_diffusion_timesteps=20, formulation=formulation, prediction_type="epsilon",
                          loss_weighting="min_snr" if formulation == "ddpm" else "none")
    step = TrainStep(model, model, Schedule(cfg), Precision("fp32", None, "cpu"), opt, lr, torch.device("cpu"),
                     loss_weighting=cfg.loss_weighting)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    result = step.step([torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)])
    assert torch.isfinite(result.loss) and result.skipped.item() == 0.0
    cond = seen[0]
    if formulation == "edm":  # c_noise = ln(sigma) / 4, continuous
        assert cond.dtype == torch.float32 and (cond.abs() < 5).all()
    else:
        assert cond.dtype == torch.long and step.min_snr_gamma == 5.0
