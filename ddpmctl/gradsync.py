"""Data-parallel gradients without DistributedDataParallel, for a training step replayed as a CUDA graph."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def bind_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Make ``grads[i]`` the .grad of ``params[i]``, keeping the values of any other .grad found there."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is not g:
            if p.grad is not None:
                g.copy_(p.grad)
            p.grad = g


class GradSync:
    """Data-parallel gradients without DistributedDataParallel, for a step replayed as a CUDA graph.

    Every gradient is a view of one flat fp32 buffer (as DDP's ``gradient_as_bucket_view``), so a
    captured backward accumulates into fixed addresses and one all-reduce, issued after the replay and
    outside the graph, averages them across ranks. Unlike DDP it does not overlap communication with
    the backward pass; at the sizes where a graph pays (small models, launch-bound), the replay gains far more.
    A parameter that gets no gradient gets zeros rather than None (AdamW then still decays it); every
    parameter of ddpmctl's UNet takes part in each step.
    """

    def __init__(self, params: list[nn.Parameter], group: Any = None):
        if not self.supports(params):
            raise ValueError("GradSync needs dense parameters of one dtype on one device")
        self.params, self.group = params, group
        self.world = dist.get_world_size(group)
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:  # each view laid out as its parameter (channels_last too): fused AdamW pairs them flat
            self.views.append(self.flat[offset:offset + p.numel()].as_strided(p.shape, p.stride()))
            offset += p.numel()
        self.attach()

    @staticmethod
    def supports(params: list[nn.Parameter]) -> bool:
        """Whether the parameters fit one flat buffer: one dtype, one device, each densely laid out."""
        return (bool(params) and len({p.dtype for p in params}) == 1 and len({p.device for p in params}) == 1
                and all(torch.empty_like(p).stride() == p.stride() for p in params))

    def broadcast_from_rank0(self, module: nn.Module) -> None:
        """Start every rank from rank 0's weights and buffers, as DDP's constructor does."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0, group=self.group)

    def attach(self) -> None:
        """Point every .grad at its view of the flat buffer (anything that dropped or replaced one)."""
        bind_grads(self.params, self.views)

    def zero(self) -> None:
        """Attach and clear: the next backward accumulates into the flat buffer."""
        self.attach()
        self.flat.zero_()

    def all_reduce(self) -> None:
        """Average the gradients over the ranks (no host wait)."""
        self.attach()
        dist.all_reduce(self.flat, group=self.group)
        self.flat.div_(self.world)
