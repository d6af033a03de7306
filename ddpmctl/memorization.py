"""Is the model copying its training images? Nearest-neighbour distances, batched, and the share of copies.

A generated image counts as a likely copy when its nearest training image is closer than real images
from outside the training set usually are to theirs: the threshold is a low quantile of the
nearest-training-image distances of held-out real images (or, without a held-out set, of each training
image to its nearest *other* training image). By construction about ``quantile`` of real held-out
images fall under it, which is the floor a healthy model sits at.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_QUANTILE = 0.05  # real held-out images under the threshold by construction: the floor of the score


@dataclass
class Neighbours:
    distance: torch.Tensor  # (N,) Euclidean distance of each query to its nearest reference
    index: torch.Tensor  # (N,) index of that reference
    second: torch.Tensor  # (N,) distance to the second nearest (inf when there is one reference)


def nearest(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False,
            batch: int = 1024) -> Neighbours:
    """Nearest and second-nearest reference of each query row, by Euclidean distance: (N, D), (M, D) -> (N,).

    Computed as ||q||^2 - 2 q.r + ||r||^2 in batches of ``batch`` queries (one matrix product each), in
    float32. ``exclude_self``: queries are the references themselves (same order), and each row's own
    entry is skipped (leave-one-out).
    """
    q, r = queries.flatten(1).float(), references.flatten(1).float()
    r_sq = r.square().sum(1)
    dist, idx, second = [], [], []
    for start in range(0, q.shape[0], batch):
        block = q[start:start + batch]
        d2 = (block.square().sum(1, keepdim=True) - 2 * block @ r.T + r_sq).clamp_min_(0)
        if exclude_self:
            rows = torch.arange(block.shape[0])
            d2[rows, rows + start] = float("inf")
        k = min(2, r.shape[0])
        values, where = d2.topk(k, dim=1, largest=False)
        dist.append(values[:, 0].sqrt())
        idx.append(where[:, 0])
        second.append(values[:, 1].sqrt() if k == 2 else torch.full_like(values[:, 0], float("inf")))
    return Neighbours(torch.cat(dist), torch.cat(idx), torch.cat(second))


def copy_threshold(real_distances: torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> float:
    """The distance under which a sample counts as closer than real held-out images usually are."""
    return float(torch.quantile(real_distances.float(), quantile))


def copy_share(sample_distances: torch.Tensor, threshold: float) -> float:
    """Share of samples whose nearest training image is closer than ``threshold``."""
    return float((sample_distances < threshold).float().mean()) if sample_distances.numel() else 0.0
