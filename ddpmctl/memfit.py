"""Peak training memory as a line in the batch size, and what it implies. Imports nothing of ddpmctl.

``doctor`` (the parent) and ``doctor_child`` (the probe) both fit with :func:`fit_line`, so they agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Bytes each parameter costs in training, whatever the batch: fp32 weight, gradient, AdamW m and v, EMA copy.
BYTES_PER_PARAMETER = 20


@dataclass
class Fit:
    """Peak memory model: intercept + slope * batch, in bytes."""

    intercept: float
    slope: float
    points: int
    source: str  # "least squares over N points" or how it was derived

    def predict(self, batch: int) -> float:
        return self.intercept + self.slope * batch

    def max_batch(self, budget: float, headroom: float) -> int:
        """Largest batch whose predicted peak stays under budget * (1 - headroom); 0 if not even one fits."""
        usable = budget * (1 - headroom)
        if self.slope <= 0:
            return 0 if self.intercept > usable else 1 << 20
        return max(0, math.floor((usable - self.intercept) / self.slope + 1e-9))


def fit_line(points: list[tuple[int, float]]) -> Fit | None:
    """Least-squares peak = a + b * batch over (batch, peak) points; None with fewer than two batch sizes."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (y - my) for b, y in points) / sxx
    return Fit(my - slope * mx, slope, n, f"least squares over {n} measured batch sizes")


def limit_by_oom(max_batch: int, points: Iterable[Any]) -> int:
    """A batch that ran out of memory (a point with ``.oom`` and ``.batch``) bounds the answer, whatever the fit says."""
    failed = [p.batch for p in points if p.oom]
    return min([max_batch] + [b - 1 for b in failed])


def recommend(max_batch: int, target_effective: int) -> tuple[int, int]:
    """(batch, accumulation) with batch <= max_batch and batch * accumulation >= target, batch as even as can be."""
    if max_batch < 1:
        raise ValueError("nothing fits")
    accum = math.ceil(target_effective / min(max_batch, target_effective))
    return math.ceil(target_effective / accum), accum


def extrapolate(measured_fit: Fit | None, budget: int, headroom: float, images_per_sec: float | None,
                measured: Any, target: Any) -> tuple[int | None, float | None]:
    """(largest batch, images/s) for another model from a measured one (``measured``/``target``: cost.ModelCost).

    Memory: the per-image slope scales with the activations saved for backward, the intercept with the
    parameters (BYTES_PER_PARAMETER each). Speed: images/s scales with 1 / FLOPs per image.
    """
    max_batch = None
    if measured_fit is not None and budget:
        scaled = Fit(measured_fit.intercept + BYTES_PER_PARAMETER * (target.parameters - measured.parameters),
                     measured_fit.slope * target.activation_bytes / max(measured.activation_bytes, 1), 0, "extrapolated")
        max_batch = scaled.max_batch(budget, headroom)
    ips = images_per_sec * measured.flops / target.flops if images_per_sec else None
    return max_batch, ips
