"""Parameters, activation bytes and FLOPs of a config, counted on the ``meta`` device (no memory, no compute)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .runtime import build_model


@dataclass
class ModelCost:
    parameters: int
    activation_bytes: int  # saved for backward, per image, fp32
    flops: float  # forward + backward per image (3x forward)


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel: keeps q, k, v, out and the log-sum-exp, not the N x N matrix."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # pragma: no cover - never run
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _attention_as(kind: str, extra_flops: list[float]) -> Iterator[None]:
    """Model the attention of ``kind``: 'flash' (fused CUDA kernels) or 'math' (N x N weights kept: MPS, CPU)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
        if kind == "math":
            weights = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
            return weights @ v
        b, h, n, d = q.shape
        extra_flops.append(4.0 * b * h * n * n * d)  # QK^T and AV, 2 flops per multiply-add
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def model_cost(cfg: Config, attention: str = "flash") -> ModelCost:
    """Parameters, activation bytes saved per image and FLOPs per image, from one forward on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(cfg)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # keep the saved tensors alive so storage ids stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
            keep.append(t)
        return t

    size = cfg.model.img_size
    extra: list[float] = []
    x = torch.empty(1, 3, size, size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with _attention_as(attention, extra), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with FlopCounterMode(display=False) as counter:
            model(x, t)
    return ModelCost(sum(p.numel() for p in model.parameters()), sum(saved.values()),
                     3.0 * (counter.get_total_flops() + sum(extra)))
