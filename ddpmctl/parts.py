"""Everything a training step needs, built from a Config in one place: the engine, doctor's probe and
benchmarks/compare.py all call :func:`build_parts`, so what they measure is what ``train`` runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from .config import Config
from .diffusion import Schedule
from .gradsync import GradSync
from .model import set_low_precision_norms
from .runtime import DistInfo, Precision, build_model, low_precision_norms
from .state import EMA
from .step import TrainStep, graph_blocker, make_optimizer


@dataclass
class Parts:
    model: nn.Module  # the network being trained (unwrapped)
    ema: EMA | None
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR  # cosine with linear warmup
    schedule: Schedule  # the diffusion schedule
    step: TrainStep


def build_parts(cfg: Config, device: torch.device, precision: Precision, dist_info: DistInfo | None = None,
                weights: dict[str, torch.Tensor] | None = None) -> Parts:
    """Model (seeded by ``cfg.run.seed``, the same on every rank), EMA, AdamW, LR schedule and the training step.

    ``weights``: start the model (and the EMA) from these instead of the random initialisation (fine-tuning).

    Under torchrun (``dist_info.enabled``) the gradients are averaged by GradSync around a CUDA graph where one
    can be captured, else by DistributedDataParallel; ``cfg.training.compile`` compiles the network after that.
    """
    t = cfg.training
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    if weights is not None:
        model.load_state_dict(weights)
    model = model.to(device)
    channels_last = t.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_low_precision_norms(model, low_precision_norms(device))
    model.gradient_checkpointing = t.gradient_checkpointing  # the EMA copy samples without gradients: never used there
    per_update = t.batch_size * t.gradient_accumulation_steps * (dist_info.world_size if dist_info else 1)
    ema = EMA(model, t.ema_decay, t.ema_warmup, t.ema_halflife_images, per_update) if t.ema_decay > 0 else None
    optimizer = make_optimizer(model.parameters(), t.learning_rate, t.weight_decay, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.num_training_steps)
    schedule = Schedule(cfg.diffusion, device)

    train_model: nn.Module = model
    ddp, grad_sync = None, None
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dist_info is not None and dist_info.enabled:
        graph_possible = t.cuda_graph and graph_blocker(device, precision, t.gradient_accumulation_steps, False,
                                                        t.gradient_checkpointing) is None
        if graph_possible and GradSync.supports(trainable):
            # A replayed graph beats DDP's overlap of communication and backward (docs/performance.md):
            # all-reduce after each replay instead.
            grad_sync = GradSync(trainable)
            grad_sync.broadcast_from_rank0(model)
        else:
            ids = [device.index] if device.type == "cuda" else None
            train_model = ddp = DistributedDataParallel(model, device_ids=ids)
    if t.compile:  # after DDP, as PyTorch advises: Dynamo then splits the graph at DDP's buckets
        train_model = torch.compile(train_model)
    step = TrainStep(
        model, train_model, schedule, precision, optimizer, scheduler, device, ema=ema,
        loss_fn=cfg.diffusion.loss_fn, loss_weighting=cfg.diffusion.loss_weighting,
        min_snr_gamma=cfg.diffusion.min_snr_gamma, random_flip=cfg.data.random_flip, channels_last=channels_last,
        # a network without augmentation inputs (doctor's probe of a --config with augment) trains unaugmented
        augment=cfg.data.augment if cfg.model.augment_dim else 0.0, class_dropout=cfg.training.class_dropout,
        accumulation=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm, ddp=ddp, grad_sync=grad_sync,
        cuda_graph=t.cuda_graph, graph_batch=t.batch_size, checkpointing=t.gradient_checkpointing,
        fixed_shape=device.type == "mps",
    )
    return Parts(model, ema, optimizer, scheduler, schedule, step)
