"""Is the model copying its training images? Nearest training images of samples, and the share of copies.

A generated image counts as a likely copy when its nearest training image is closer than real images
from outside the training set usually are to theirs: the threshold is a low quantile of the
nearest-training-image distances of held-out real images (or, without a held-out set, of each training
image to its nearest *other* training image, leave-one-out). By construction about ``quantile`` of real
held-out images fall under it, which is the floor a healthy model sits at.

Distances are measured in two spaces, each against every training image and its mirror image (training
flips images at random, so a mirrored copy is a copy): pixels (at most PIXEL_SIZE square), and the fixed
descriptor of :mod:`ddpmctl.descriptor`, which catches recoloured and (on textured images) shifted copies
that pixel distances miss. A sample is a likely copy when it is under the threshold in either space; the
same rule applied to the training images themselves gives the floor. Beside it, the distance-ratio test
of Yoon et al. 2023 (also Gu et al. 2023): nearest / second-nearest training image < 1/3, a copy of one
image in particular rather than a sample from a dense region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .descriptor import describe

View = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]  # another version of the references (nearest())

DEFAULT_QUANTILE = 0.05  # real held-out images under the threshold by construction: the floor of the score


@dataclass
class Neighbours:
    distance: torch.Tensor  # (N,) Euclidean distance of each query to its nearest reference
    index: torch.Tensor  # (N,) index of that reference
    second: torch.Tensor  # (N,) distance to the second nearest (inf when there is one reference)
    view: torch.Tensor | None = None  # (N,) which view of the nearest reference was nearest (0: itself)


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows as float32 on ``device``; uint8 pixels become [0, 1]."""
    x = x.to(device).flatten(1)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def nearest(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False,
            batch: int = 1024, views: Sequence[View] = (), exclude: torch.Tensor | None = None,
            chunk: int = 4096, device: torch.device | str | None = None) -> Neighbours:
    """Nearest and second-nearest reference of each query row, by Euclidean distance: (N, D), (M, D) -> (N,).

    Computed as ||q||^2 - 2 q.r + ||r||^2 in blocks of ``batch`` queries by ``chunk`` references (one
    matrix product each, in float32), so neither side is ever converted to float whole: uint8 rows
    (pixels) are read as [0, 1]. ``views``: other versions of the references, each a tensor of the same
    shape and order or a function of a slice of ``references`` (``lambda r: r.flip(-1)``: their mirror
    images, never held in memory whole); a reference's distance is the smallest over itself and its views, and the
    second nearest is another reference, never a view of the nearest. ``exclude_self``: queries are the
    references themselves (same order), and each row's own entry is skipped (leave-one-out);
    ``exclude``: (N,) the reference index to skip for each query (the same for a subset of them).
    """
    dev = torch.device(device) if device is not None else queries.device
    n, m = queries.shape[0], references.shape[0]
    if exclude_self:
        exclude = torch.arange(n)
    skip = exclude.to(dev) if exclude is not None else None
    sides = (references, *views)
    out_d, out_i, out_s, out_v = [], [], [], []
    for start in range(0, n, batch):
        q = _as_float(queries[start:start + batch], dev)
        q_sq = q.square().sum(1, keepdim=True)
        rows = torch.arange(q.shape[0], device=dev)
        best = torch.full((q.shape[0], 2), float("inf"), device=dev)  # running two smallest squared distances
        best_i = torch.zeros((q.shape[0], 2), dtype=torch.long, device=dev)
        best_v = torch.zeros(q.shape[0], dtype=torch.long, device=dev)
        for lo in range(0, m, chunk):
            d2, which = None, None
            for v, side in enumerate(sides):
                r = _as_float(side(references[lo:lo + chunk]) if callable(side) else side[lo:lo + chunk], dev)
                dv = (q_sq - 2 * q @ r.T + r.square().sum(1)).clamp_min_(0)  # (b, c)
                if d2 is None:
                    d2, which = dv, torch.zeros_like(dv, dtype=torch.long)
                else:
                    closer = dv < d2
                    d2, which = torch.where(closer, dv, d2), torch.where(closer, v, which)
            if skip is not None:
                own = skip[start:start + q.shape[0]] - lo
                inside = (own >= 0) & (own < d2.shape[1])
                d2[rows[inside], own[inside]] = float("inf")
            k = min(2, d2.shape[1])
            values, where = d2.topk(k, dim=1, largest=False)
            views_of = which.gather(1, where[:, :1]).squeeze(1)
            # merge the chunk's two best with the running two best
            cand = torch.cat([best, values], 1)
            cand_i = torch.cat([best_i, where + lo], 1)
            order = cand.argsort(dim=1, stable=True)[:, :2]  # stable: on a tie the earlier reference wins
            best_v = torch.where(order[:, 0] == 2, views_of, best_v)
            best, best_i = cand.gather(1, order), cand_i.gather(1, order)
        out_d.append(best[:, 0].sqrt().cpu())
        out_i.append(best_i[:, 0].cpu())
        out_s.append(best[:, 1].sqrt().cpu())
        out_v.append(best_v.cpu())
    if not out_d:
        empty = torch.zeros(0)
        return Neighbours(empty, empty.long(), empty, empty.long())
    return Neighbours(torch.cat(out_d), torch.cat(out_i), torch.cat(out_s), torch.cat(out_v))


def copy_threshold(real_distances: torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> float:
    """The distance under which a sample counts as closer than real held-out images usually are."""
    return float(torch.quantile(real_distances.float(), quantile))


def copy_share(sample_distances: torch.Tensor, threshold: float) -> float:
    """Share of samples whose nearest training image is closer than ``threshold``."""
    return float((sample_distances < threshold).float().mean()) if sample_distances.numel() else 0.0


# ----------------------------------------------------------------------------- the training images, once per run

PIXEL_SIZE = 64  # pixel distances at most 64 x 64 (area-downsampled): 10k training images then take 123 MB
REAL_MAX = 2000  # the thresholds come from the leave-one-out distances of at most this many training images
RATIO = 1 / 3  # Yoon et al. 2023: nearest / second-nearest training image under 1/3 is a copy of that one
SPACES = ("pixel", "features")


def mirror(images: torch.Tensor) -> torch.Tensor:
    """Left-right mirror images of (..., W) rows: the flip training applies at random."""
    return images.flip(-1)


def pixel_view(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> uint8 (N, 3, s, s) with s = min(S, PIXEL_SIZE): what pixel distances compare."""
    if images.shape[-1] <= PIXEL_SIZE:
        return images
    small = torch.nn.functional.interpolate(images.float(), size=(PIXEL_SIZE, PIXEL_SIZE), mode="area")
    return small.round().clamp(0, 255).to(torch.uint8)


@dataclass
class TrainingReference:
    """The training images as the report compares samples with them; built once per run (:func:`build_reference`)."""

    pixels: torch.Tensor  # uint8 (M, 3, s, s), s = min(img_size, PIXEL_SIZE)
    features: torch.Tensor  # (M, F) descriptors
    mirrored: torch.Tensor  # (M, F) descriptors of the mirror images
    real: dict[str, Neighbours]  # per space: leave-one-out neighbours of the training images in ``subset``
    subset: torch.Tensor  # (K,) indices of the training images whose distances set the thresholds
    image: Callable[[int], torch.Tensor] | None = None  # training image i at full size, uint8 (3, S, S)
    quantile: float = DEFAULT_QUANTILE

    @property
    def count(self) -> int:
        return self.pixels.shape[0]

    def threshold(self, space: str) -> float:
        return copy_threshold(self.real[space].distance, self.quantile)

    def real_flags(self) -> torch.Tensor:
        """(K,) whether each training image in ``subset`` is a 'likely copy' of another: the report's floor."""
        return torch.stack([self.real[s].distance < self.threshold(s) for s in SPACES]).any(0)

    def training_image(self, index: int, mirrored: bool = False) -> torch.Tensor:
        """Training image ``index``, uint8 (3, S, S), mirrored if that is the version a sample matched."""
        img = self.image(index) if self.image is not None else self.pixels[index]
        return mirror(img) if mirrored else img


def build_reference(images: torch.Tensor, real_max: int = REAL_MAX, seed: int = 0,
                    device: torch.device | str | None = None, image: Callable[[int], torch.Tensor] | None = None,
                    quantile: float = DEFAULT_QUANTILE) -> TrainingReference:
    """Descriptors and leave-one-out distances of the training images, uint8 (M, 3, S, S) with M >= 2.

    The leave-one-out distances (each image to its nearest other training image, mirror images
    included) of at most ``real_max`` of them, drawn with ``seed``, set the copy thresholds: the cost is
    real_max x 2M distances per space, about a minute for 10k 64 px images on 2 CPU cores (what
    memorization_io caches). ``image``: training image i at full size, for pictures of pairs.
    """
    if images.shape[0] < 2:
        raise ValueError("the memorization report needs at least 2 training images")
    pixels = pixel_view(images)
    features, mirrored = describe_all(pixels, device)  # from the pixel view, as for samples
    k = min(images.shape[0], real_max)
    subset = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:k].sort().values
    real = {
        "pixel": nearest(pixels[subset], pixels, views=[mirror], exclude=subset, device=device),
        "features": nearest(features[subset], features, views=[mirrored], exclude=subset, device=device),
    }
    return TrainingReference(pixels, features, mirrored, real, subset, image, quantile)


def describe_all(images: torch.Tensor, device: torch.device | str | None = None,
                 batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors of uint8 (N, 3, S, S) images and of their mirror images, in batches: (N, F) twice, on the CPU."""
    dev = torch.device(device) if device is not None else images.device
    plain, mirrored = [], []
    for start in range(0, images.shape[0], batch):
        block = images[start:start + batch].to(dev)
        plain.append(describe(block).cpu())
        mirrored.append(describe(mirror(block)).cpu())
    return torch.cat(plain), torch.cat(mirrored)


# ----------------------------------------------------------------------------- samples against the reference


def ratio(n: Neighbours) -> torch.Tensor:
    """(N,) nearest / second-nearest distance; 1 where there is no second (the ratio test then says nothing)."""
    r = n.distance / n.second
    return torch.where(torch.isfinite(n.second) & (n.second > 0), r, torch.ones_like(r))


@dataclass
class SpaceSummary:
    """One space's figures; pixel distances as the RMS difference per pixel in 0-255 levels."""

    threshold: float  # nearest distances under this count as likely copies (the quantile of the real ones)
    median: float  # median distance of the samples to their nearest training image
    real_median: float  # median distance of training images to their nearest other training image
    share: float  # samples under the threshold
    ratio_share: float  # samples whose nearest / second-nearest training image is under RATIO
    real_ratio_share: float  # the same for training images (leave-one-out)


@dataclass
class MemorizationResult:
    num_samples: int
    num_training: int
    num_real: int  # training images whose leave-one-out distances set the thresholds
    copy_share: float  # samples under the threshold in either space: the likely copies
    real_share: float  # training images under it in either space: what a model that copies nothing scores
    pixel: SpaceSummary
    features: SpaceSummary
    closest: list[dict]  # the closest samples, closest first: sample, training image, space, distances
    pairs: torch.Tensor | None = None  # uint8 (k, 2, 3, S, S): each closest sample and its training image
    nearest_png: str | None = None  # where the pairs were written

    @property
    def copying(self) -> bool:
        """Clearly more likely copies than the floor: at least twice it, and a one-sided binomial p < 0.01."""
        n, k = self.num_samples, round(self.copy_share * self.num_samples)
        return n > 0 and self.copy_share >= 2 * self.real_share and binomial_tail(n, k, self.real_share) < 0.01

    def line(self) -> str:
        """One line for a log: likely copies against the floor, and how near the samples sit."""
        return (f"likely copies {100 * self.copy_share:.0f}% of {self.num_samples} (floor "
                f"{100 * self.real_share:.0f}%), nearest training image at {self.pixel.median / self.pixel.real_median:.2f}x "
                f"(pixels) / {self.features.median / self.features.real_median:.2f}x (features) the spacing of the "
                "training images" + ("; it copies training images" if self.copying else ""))

    def metrics(self) -> dict[str, float]:
        """Flat figures for metrics.jsonl."""
        return {"copy_share": self.copy_share, "copy_floor": self.real_share,
                "nearest_pixel_rms": self.pixel.median, "nearest_pixel_ratio": self.pixel.median / self.pixel.real_median,
                "nearest_feature": self.features.median,
                "nearest_feature_ratio": self.features.median / self.features.real_median,
                "ratio_test_share": self.pixel.ratio_share}

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("pairs", "pixel", "features")}
        return {**out, "copying": self.copying, "pixel": dict(self.pixel.__dict__),
                "features": dict(self.features.__dict__)}


class MemorizationCheck:
    """Finds each sample's nearest training image, batch by batch, keeping the ``keep`` closest samples."""

    def __init__(self, reference: TrainingReference, keep: int = 16, device: torch.device | str | None = None):
        self.ref, self.keep, self.device = reference, keep, device
        self.found: dict[str, list[Neighbours]] = {s: [] for s in SPACES}
        self.kept: list[tuple[float, int, torch.Tensor]] = []  # (closeness, sample index, uint8 image)
        self.count = 0

    def add(self, samples: torch.Tensor) -> None:
        """uint8 (B, 3, S, S) samples (what the PNGs hold: sampling.to_uint8)."""
        ref, small = self.ref, pixel_view(samples)
        px = nearest(small, ref.pixels, views=[mirror], device=self.device)
        ft = nearest(describe_all(small, self.device)[0], ref.features, views=[ref.mirrored], device=self.device)
        self.found["pixel"].append(px)
        self.found["features"].append(ft)
        if self.keep:
            closeness = torch.minimum(px.distance / ref.threshold("pixel"), ft.distance / ref.threshold("features"))
            for i in closeness.argsort()[:self.keep].tolist():
                self.kept.append((float(closeness[i]), self.count + i, samples[i].cpu()))
            self.kept = sorted(self.kept, key=lambda k: k[0])[:self.keep]
        self.count += samples.shape[0]

    def result(self) -> MemorizationResult:
        ref = self.ref
        found = {s: _cat(self.found[s]) for s in SPACES}
        flags = torch.stack([found[s].distance < ref.threshold(s) for s in SPACES]).any(0)
        summaries = {s: _summary(found[s], ref, s) for s in SPACES}
        closest, pairs = [], []
        for _, i, img in self.kept:
            # show the training image of the space in which the sample is nearer (relative to its threshold)
            rel = {s: float(found[s].distance[i]) / ref.threshold(s) for s in SPACES}
            space = min(rel, key=rel.get)
            j, mirrored = int(found[space].index[i]), bool(found[space].view[i])
            closest.append({"sample": i, "training_index": j, "mirrored": mirrored, "space": space,
                            "pixel_rms": _rms(float(found["pixel"].distance[i]), ref),
                            "feature_distance": float(found["features"].distance[i]), "likely_copy": bool(flags[i])})
            pairs.append(torch.stack([img, _fit(ref.training_image(j, mirrored), img.shape[-1])]))
        return MemorizationResult(
            num_samples=self.count, num_training=ref.count, num_real=int(ref.subset.numel()),
            copy_share=float(flags.float().mean()) if self.count else 0.0,
            real_share=float(ref.real_flags().float().mean()), pixel=summaries["pixel"],
            features=summaries["features"], closest=closest, pairs=torch.stack(pairs) if pairs else None,
        )


def check_samples(samples: torch.Tensor, reference: TrainingReference, keep: int = 0,
                  device: torch.device | str | None = None) -> MemorizationResult:
    """The report for a few uint8 (N, 3, S, S) samples, e.g. a training evaluation's grid.

    Cheap once ``reference`` is built (once per run, :func:`build_reference`): N x 2M distances per space.
    ``result.line()`` is one line for the log, ``result.metrics()`` the figures for metrics.jsonl.
    """
    check = MemorizationCheck(reference, keep, device)
    check.add(samples)
    return check.result()


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely k copies of n are from a model that copies nothing."""
    p = min(max(p, 1e-9), 1 - 1e-9)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
               + (n - i) * math.log1p(-p) for i in range(max(k, 0), n + 1)]  # in logs: n may be 50,000
    return min(1.0, sum(math.exp(v) for v in log_pmf))


def _cat(parts: list[Neighbours]) -> Neighbours:
    if not parts:
        empty = torch.zeros(0)
        return Neighbours(empty, empty.long(), empty, empty.long())
    return Neighbours(*(torch.cat([getattr(p, f) for p in parts]) for f in ("distance", "index", "second", "view")))


def _rms(distance: float, ref: TrainingReference) -> float:
    """A pixel-space L2 distance of [0, 1] images as the RMS difference per pixel value, in 0-255 levels."""
    return distance * 255 / ref.pixels[0].numel() ** 0.5


def _summary(found: Neighbours, ref: TrainingReference, space: str) -> SpaceSummary:
    real = ref.real[space]
    scale = (lambda d: _rms(d, ref)) if space == "pixel" else (lambda d: d)
    median = float(found.distance.median()) if found.distance.numel() else float("nan")
    return SpaceSummary(
        threshold=scale(ref.threshold(space)), median=scale(median), real_median=scale(float(real.distance.median())),
        share=copy_share(found.distance, ref.threshold(space)),
        ratio_share=float((ratio(found) < RATIO).float().mean()) if found.distance.numel() else 0.0,
        real_ratio_share=float((ratio(real) < RATIO).float().mean()),
    )


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 (3, S, S) training image at the samples' size (the reference keeps them at most PIXEL_SIZE)."""
    if image.shape[-1] == size:
        return image
    return torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
