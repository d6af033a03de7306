"""The CUDA-only paths: the captured training step, whole-loop sampling graphs, compiled sampling.

Skipped where no CUDA GPU is present (CI); on a GPU machine: ``python -m pytest tests/test_cuda.py``
(``benchmarks/gpu_session.sh`` runs it first). Tiny models: a few seconds plus one compilation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmctl import config as config_mod
from ddpmctl import sampling
from ddpmctl.config import DiffusionConfig, ModelConfig
from ddpmctl.demo_data import make_demo_dataset
from ddpmctl.diffusion import Schedule
from ddpmctl.engine import Note, StepStats, StopFlag, train
from ddpmctl.errors import TrainingStopped
from ddpmctl.model import UNet
from ddpmctl.runtime import Precision, prepare_for_sampling
from ddpmctl.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ModelConfig(img_size=16, starting_channels=16, channel_multipliers=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), dropout=0.1)
BF16 = Precision("bf16", torch.bfloat16, "cuda")


def _graph_step(model: UNet, graph_batch: int, train_model: torch.nn.Module | None = None, **kw: object) -> TrainStep:
    """A bf16 TrainStep with the CUDA graph on (fused AdamW, constant LR), as the engine builds it."""
    torch.manual_seed(0)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = {"cuda_graph": True, **kw}
    return TrainStep(model, train_model or model, Schedule(DiffusionConfig(), device), BF16, opt, lr, device,
                     graph_batch=graph_batch, **kw)


def test_captured_step_trains_and_takes_a_short_batch_without_leaving_the_graph():
    model = UNet(TINY).cuda()
    step = _graph_step(model, 8)
    before = [p.detach().clone() for p in model.parameters()]
    for n in (8, 8, 3, 8):  # a short batch (an epoch's last) fills the first rows of the same graph
        result = step.step([torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)])
        assert step.graph is not None and step.graph_note is None and result.skipped.item() == 0.0
        assert torch.isfinite(result.loss) and torch.isfinite(result.grad_norm) and float(step.static_rows) == n
        assert all(p.grad is g for p, g in zip(step.params, step.graph_grads, strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True) if a.numel() > 1)


def test_captured_step_of_a_class_conditional_augmented_run_matches_eager():
    """Class labels ride in the graph's static rows, and the augmentation runs inside the graph."""
    import dataclasses

    cfg = dataclasses.replace(TINY, dropout=0.0, class_names=("a", "b", "c"), augment_dim=7)
    torch.manual_seed(0)
    a, b = UNet(cfg).cuda(), UNet(cfg).cuda()
    b.load_state_dict(a.state_dict())
    eager = _graph_step(a, 8, cuda_graph=False, augment=0.5)
    graphed = _graph_step(b, 8, augment=0.5)
    data = torch.Generator().manual_seed(0)
    for n in (8, 8, 5):
        batch = (torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=data),
                 torch.randint(0, 3, (n,), generator=data))
        outs = []
        for step in (eager, graphed):
            torch.manual_seed(n)
            result = step.step([batch])
            outs.append((result.loss, result.grad_norm))
        assert graphed.graph is not None and graphed.graph_note is None
        assert torch.equal(graphed.static_labels[:n].cpu(), batch[1])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-4)  # bf16, graph vs eager kernels


def test_captured_step_with_grad_sync_matches_the_plain_graph(tmp_path):
    """torchrun's graph path (GradSync: all-reduce after the replay, then clip) at world size 1, over NCCL."""
    import torch.distributed as dist

    from ddpmctl.gradsync import GradSync

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        a, b = UNet(TINY).cuda(), UNet(TINY).cuda()
        b.load_state_dict(a.state_dict())
        step_a = _graph_step(a, 8)
        step_b = _graph_step(b, 8)
        step_b.grad_sync = GradSync(step_b.params)
        batches = [torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8) for n in (8, 8, 5)]
        for batch in batches:
            outs = []
            for step in (step_a, step_b):
                torch.manual_seed(1)
                torch.cuda.manual_seed(1)
                result = step.step([batch])
                assert step.graph is not None and step.graph_note is None
                outs.append((result.loss, result.grad_norm))
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-5)
        assert all(p.grad is v for p, v in zip(step_b.params, step_b.grad_sync.views, strict=True))
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5)
    finally:
        dist.destroy_process_group()


def _two_ranks_on_one_gpu(rank: int, world: int, store: str) -> None:
    """One of two gloo ranks sharing the GPU: the graphed GradSync step against DDP's eager one."""
    import dataclasses

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ddpmctl.gradsync import GradSync

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = dataclasses.replace(TINY, dropout=0.0)  # no dropout: graph and eager draw the same numbers
        a, b = UNet(cfg).cuda(), UNet(cfg).cuda()
        b.load_state_dict(a.state_dict())
        ddp = DistributedDataParallel(a)
        step_a = _graph_step(a, 8, train_model=ddp, ddp=ddp, cuda_graph=False, random_flip=False)
        step_b = _graph_step(b, 8, grad_sync=GradSync([p for p in b.parameters()]), random_flip=False)
        data = torch.Generator().manual_seed(rank)
        for i in range(3):
            batch = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=data)  # each rank its own
            outs = []
            for step in (step_a, step_b):
                torch.manual_seed(100 * i + rank)
                result = step.step([batch])
                outs.append((result.loss, result.grad_norm))
            assert step_b.graph is not None and step_b.graph_note is None
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-4)  # bf16, graph vs eager kernels
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=5e-3)  # 3 AdamW steps of lr 1e-3
        total = torch.stack([p.detach().double().sum() for p in b.parameters()]).sum().reshape(1).cpu()
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(gathered, total)
        assert gathered[0].item() == gathered[1].item()  # the all-reduce ran: the ranks hold the same weights
        del ddp, step_a
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_the_graphed_step_with_grad_sync_as_ddp(tmp_path):
    """torchrun's CUDA-graph path at world size 2 (gloo with CUDA tensors: NCCL needs one GPU per rank)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks_on_one_gpu, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _options(data: Path, tmp: Path, name: str, **extra: object) -> dict:
    opts = {
        "experiment_name": name, "path_to_data": str(data), "working_directory": str(tmp / "w"),
        "generated_directory": str(tmp / "g"), "img_size": 16, "starting_channels": 16,
        "channel_multipliers": "1,2", "attention_resolutions": "8", "num_diffusion_timesteps": 50,
        "batch_size": 4, "warmup_steps": 1, "num_workers": 0, "num_generations": 2, "log_interval": 1,
        "evaluation_interval": 100, "num_training_steps": 8, "device": "cuda", "precision": "bf16",
    }
    opts.update(extra)
    return opts


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_engine_with_the_graph_crosses_epochs_and_resumes_to_the_same_losses(tmp_path):
    data = make_demo_dataset(tmp_path / "data", num_images=10, size=16, seed=0)  # batches of 4, 4, 2 per epoch
    events: list[object] = []
    train(config_mod.resolve(None, _options(data, tmp_path, "straight")), events.append)
    assert not [e for e in events if isinstance(e, Note) and "CUDA graph" in e.text]
    straight = _losses(tmp_path / "w" / "straight")
    assert len(straight) == 8 and all(torch.isfinite(torch.tensor(straight)))

    flag = StopFlag()

    def on_event(event: object) -> None:
        if isinstance(event, StepStats) and event.step == 4:
            flag.request("test")

    opts = _options(data, tmp_path, "split")
    with pytest.raises(TrainingStopped):
        train(config_mod.resolve(None, opts), on_event, flag)
    train(config_mod.resolve(None, {**opts, "resume_from_checkpoint": "latest"}))
    # Same data order, flips, timesteps and noise after the resume (the graph's warm-up gives its draws
    # back); some cuDNN backward kernels add in a varying order, hence a tolerance well below the
    # few-percent spread of the losses themselves.
    assert _losses(tmp_path / "w" / "split") == pytest.approx(straight, rel=1e-3)
    weights = load_file(str(tmp_path / "w" / "split" / "checkpoint_8" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_sampling_graph_matches_the_eager_loop_and_is_reused(sampler):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = prepare_for_sampling(UNet(TINY).to(device).eval().requires_grad_(False), device)
    sched = Schedule(DiffusionConfig(), device)
    graphs = sampling.SamplingGraphs()
    captured = []
    for seed in (1, 2):
        noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(device)
        graphed = sampling.sample(model, sched, noise, sampler=sampler, steps=10, autocast=BF16.autocast, graphs=graphs)
        eager = sampling.sample(model, sched, noise, sampler=sampler, steps=10, autocast=BF16.autocast)
        assert graphs.failed is None and graphs.graph is not None
        torch.testing.assert_close(graphed.images, eager.images, atol=2e-2, rtol=0)
        captured.append(graphs.graph)
    assert captured[0] is captured[1]  # the second batch of the same shape replayed the same graph


def test_compiled_sampling_skips_the_outer_graph_and_runs():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = prepare_for_sampling(UNet(TINY).to(device).eval().requires_grad_(False), device, compile=True)
    sched = Schedule(DiffusionConfig(), device)
    graphs = sampling.SamplingGraphs()
    noise = torch.randn(4, 3, 16, 16, device=device)
    for _ in range(3):  # compile, record the compiler's graphs, replay them
        out = sampling.sample(model, sched, noise, sampler="ddim", steps=5, autocast=BF16.autocast, graphs=graphs)
    assert graphs.graph is None and torch.isfinite(out.images).all()


class _Uncapturable(UNet):
    """Reads a value back to the host while a graph is being captured: the capture fails."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            float(x.sum())
        return super().forward(x, t)


def test_a_failed_capture_falls_back_to_eager_and_cuda_keeps_working():
    device = torch.device("cuda")
    model = _Uncapturable(TINY).to(device)
    step = _graph_step(model, 4)
    for _ in range(2):  # the failed capture, then a plain eager step: random draws and the stream still work
        loss = step.step([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)]).loss
        assert torch.isfinite(loss) and step.graph is None and not step.use_graph
    assert step.graph_note is not None and "capture failed" in step.graph_note
    assert not torch.cuda.is_current_stream_capturing()

    model.eval()
    graphs = sampling.SamplingGraphs()
    noise = torch.randn(2, 3, 16, 16, device=device)
    out = sampling.sample(model, Schedule(DiffusionConfig(), device), noise, sampler="ddim", steps=4, graphs=graphs)
    assert graphs.failed is not None and torch.isfinite(out.images).all()
    torch.rand(1, device=device)  # the default generator is out of capture mode
