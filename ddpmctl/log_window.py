"""The steps since the last report, summed on the device until a report reads them (one host wait per report)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from .runtime import DistInfo
from .step import StepResult


class LogWindow:
    """The steps since the last report, summed on the device: reading them is a report's one host wait."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)  # summed over the steps whose update was applied
        self.applied = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.in_row = torch.zeros((), device=device)  # skipped steps in a row, carried across reports
        self.grad_norm = torch.zeros((), device=device)  # the last step's
        self.steps = self.images = self.images_total = 0
        self.started = time.perf_counter()

    def add(self, result: StepResult, images: int) -> None:
        self.loss += torch.where(result.skipped > 0, 0.0, result.loss)  # where, not *: NaN * 0 is NaN
        self.applied += 1 - result.skipped
        self.skipped += result.skipped
        self.in_row = (self.in_row + 1) * result.skipped
        self.grad_norm = result.grad_norm
        self.steps, self.images, self.images_total = self.steps + 1, self.images + images, self.images_total + images

    def read(self, dist_info: DistInfo, reset: bool = True) -> dict[str, Any]:
        """Mean loss (None if every update was skipped), skips, last grad norm, images/s; then (``reset``) start a
        new window. Every rank calls it: under torchrun the loss is averaged over the ranks."""
        loss = self.loss
        if dist_info.enabled:  # each rank's loss is over its own images: report the mean over the ranks
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss /= dist_info.world_size
        loss_sum, applied, skipped, in_row, grad_norm = torch.stack(
            [loss, self.applied, self.skipped, self.in_row, self.grad_norm.float()]).tolist()
        now = time.perf_counter()
        out = {"loss": loss_sum / applied if applied else None, "skipped": int(skipped), "in_row": int(in_row),
               "grad_norm": grad_norm, "steps": self.steps, "images_per_sec": self.images / max(now - self.started, 1e-9)}
        if not reset:  # a look at the window before its report (the first step): the report still covers it all
            return out
        self.loss.zero_()
        self.applied.zero_()
        self.skipped.zero_()
        self.steps, self.images, self.started = 0, 0, now
        return out
