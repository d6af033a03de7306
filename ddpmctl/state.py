"""Training state beyond the network that a checkpoint carries: the EMA weights and every RNG.

Both are kept as tensors and plain values, so a checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
from torch import nn


class EMA:
    """Exponential moving average of the weights, kept in fp32 (DDPM paper: decay 0.9999).

    Its length is a fixed decay per update, or (``halflife_images``) a half-life in training images as in
    Karras et al. 2022: the decay per update is 0.5 ** (images per update / half-life), so the average spans
    the same number of images whatever the batch size.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, halflife_images: int | None = None,
                 images_per_update: int = 1):
        self.decay = decay
        self.warmup = warmup
        self.halflife_images, self.images_per_update = halflife_images, images_per_update
        self.num_updates = 0
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update.

        Warm-up: min(decay, (1 + n) / (10 + n)) so the average forgets the random init quickly; with a
        half-life, the half-life grows with the images seen, min(half-life, 5% of them) (EDM's ramp-up).
        """
        if self.halflife_images:
            length = float(self.halflife_images)
            if self.warmup:
                length = min(length, 0.05 * self.num_updates * self.images_per_update)
            return 0.5 ** (self.images_per_update / max(length, 1e-8))
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema += (1 - decay) * (p - ema)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain values (safe for weights_only loading)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_current"] = torch.cuda.get_rng_state()  # this process's device (each torchrun rank has one)
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])  # robust to a different number of visible GPUs
    elif "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "mps" in state and getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
