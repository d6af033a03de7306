"""The quality benchmark's judge (a small CNN trained on the real training images) and the scores it gives.

Scores of N images against the held-out reference set (``ref``), each also computed for N *other*
held-out real images (``val``: the floor a perfect generator sits at, up to sampling noise) and for N
noise images (the ceiling: a generator that learnt nothing):

* ``fd``: Fréchet distance between Gaussians fitted to the judge's penultimate features (128-d) of the
  images and of ``ref`` (Dowson & Landau 1982; as FID, Heusel et al. 2017, but in the judge's features,
  so no download). Lower is better. It grows as N shrinks (bias ~ 1/N): compare at the same N only.
* ``confidence``: mean over the images of the judge's largest softmax probability (the Inception-Score
  idea, Salimans et al. 2016): whether each image clearly shows one of the 9 kinds. Higher is better.
* ``coverage_tv``: total-variation distance between the histogram of the judge's predicted labels on the
  images and on ``ref`` (0: the same mix of kinds, 1: disjoint). Lower is better; catches mode dropping.
* ``memorization``: share of images nearer to a training image than 95% of ``ref`` images are to theirs
  (``ddpmctl.memorization``: the threshold is the 5% quantile), in two views at once: pixels (Euclidean)
  and the judge's features; the mirrored training images count too (ddpmctl trains with flips). Both
  views must agree because pixels alone flag washed-out, low-contrast samples as copies: they sit near
  dull training images in L2 (at the --quick demo run, 35 of 256 blob-like samples fell under the pixel
  threshold, none of them a copy, each with a second-nearest training image as near as the first).
  Near 1 for copies of training images; for real held-out images about 0.01 (under both thresholds).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl.memorization import copy_share, copy_threshold, nearest

JUDGE_VERSION = 1  # bump when the network or its training changes: cached weights are then retrained
FEATURES = 128
EPOCHS = 20  # judge training epochs over the train split (12: 92% held-out accuracy, 20: 97.6%)


class Judge(nn.Module):
    """Seven 3x3 convolutions (32 -> 16 -> 8 -> 4 px), global average pooling to 128 features, a linear head."""

    def __init__(self, num_labels: int):
        super().__init__()
        widths = [(3, 32, 1), (32, 48, 2), (48, 48, 1), (48, 96, 2), (96, 96, 1), (96, FEATURES, 2),
                  (FEATURES, FEATURES, 1)]  # the last one sees the whole image: shape needs it
        layers: list[nn.Module] = []
        for cin, cout, stride in widths:
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURES, num_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, 32, 32) -> (B, 128) pooled features (post-ReLU, as Inception's pool3)."""
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random left-right flips and shifts of up to 2 px (reflect padding): float (B, 3, 32, 32)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return padded[:, :, 2 + dy:2 + dy + x.shape[2], 2 + dx:2 + dx + x.shape[3]]


def train_judge(images: np.ndarray, labels: np.ndarray, num_labels: int, seed: int = 0, epochs: int = EPOCHS,
                batch: int | None = None, lr: float = 3e-3) -> Judge:
    """Fit a Judge to uint8 (N, 3, 32, 32) images: AdamW with a one-cycle schedule, flips and shifts.

    ``batch`` defaults to 128, smaller for tiny sets (at least 8 steps an epoch).
    Seeded by ``seed`` alone (weights, order, augmentation) without touching the global RNG.
    """
    x = torch.from_numpy(images).float() / 127.5 - 1
    y = torch.from_numpy(labels)
    batch = batch or min(128, max(16, len(x) // 8))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(num_labels)
    steps = epochs * math.ceil(len(x) / batch)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(judge(_augment(x[idx], gen)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: Judge, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) -> (features (N, 128) float64, softmax probabilities (N, labels) float64)."""
    feats, probs = [], []
    for start in range(0, images.shape[0], batch):
        f = judge.features(images[start:start + batch])
        feats.append(f.double())
        probs.append(judge.head(f).softmax(-1).double())
    return torch.cat(feats), torch.cat(probs)


# ----------------------------------------------------------------------------- the scores


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative noise clipped)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982), in float64.

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the latter is symmetric PSD, so eigh does it
    without scipy's sqrtm (and without its complex round-off).
    """
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features."""
    return features.mean(0), torch.cov(features.T)


def noise_images(n: int, seed: int) -> torch.Tensor:
    """The ceiling's images: smooth colour blobs (8x8 Gaussian noise, bicubic to 32 px) plus fine grain, uint8."""
    gen = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn((n, 3, 8, 8), generator=gen), size=32, mode="bicubic", align_corners=False)
    fine = 0.3 * torch.randn((n, 3, 32, 32), generator=gen)
    return (127.5 + 55 * (coarse + fine)).clamp(0, 255).round().to(torch.uint8)


def flatten_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3*H*W) in [0, 1]: the space of the memorization distances."""
    return images.flatten(1).float() / 255


@dataclass
class Reference:
    """What every score compares against, computed once per image set and judge."""

    judge: Judge
    mu: torch.Tensor  # (128,) mean of ref features
    sigma: torch.Tensor  # (128, 128) covariance of ref features
    histogram: torch.Tensor  # (labels,) share of each predicted label on ref
    train_pixels: torch.Tensor  # (2 N_train, 3072) training images and their mirror images
    train_features: torch.Tensor  # (2 N_train, 128) their judge features
    copy_threshold: float  # memorization: the DEFAULT_QUANTILE of ref images' nearest-training distances (pixels)
    feature_threshold: float  # the same in the judge's features
    ref_accuracy: float  # the judge's accuracy on ref (held out from its training)


def build_reference(judge: Judge, train: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> Reference:
    """Features, label histogram and the copy threshold of the held-out reference images."""
    ref_t = torch.from_numpy(ref)
    feats, probs = judge_outputs(judge, ref_t)
    mu, sigma = gaussian(feats)
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=probs.shape[1]).double() / len(pred)
    train_t = torch.from_numpy(train)
    train_t = torch.cat([train_t, train_t.flip(-1)])
    train_pixels = flatten_pixels(train_t)
    train_features = judge_outputs(judge, train_t)[0]
    threshold = copy_threshold(nearest(flatten_pixels(ref_t), train_pixels).distance)
    feature_threshold = copy_threshold(nearest(feats, train_features).distance)
    accuracy = float((pred == torch.from_numpy(ref_labels)).double().mean())
    return Reference(judge, mu, sigma, hist, train_pixels, train_features, threshold, feature_threshold, accuracy)


def score(images: torch.Tensor | np.ndarray, ref: Reference) -> dict[str, float]:
    """fd, confidence, coverage_tv and memorization of uint8 (N, 3, 32, 32) images (see the module docstring)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"score() wants uint8 (N, 3, 32, 32) images, got {images.dtype} {tuple(images.shape)}")
    feats, probs = judge_outputs(ref.judge, images)
    mu, sigma = gaussian(feats)
    hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / images.shape[0]
    # Each view's distance over its threshold; under both thresholds <=> the larger ratio is below 1.
    in_pixels = nearest(flatten_pixels(images), ref.train_pixels).distance / ref.copy_threshold
    in_features = nearest(feats, ref.train_features).distance / ref.feature_threshold
    return {
        "fd": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "confidence": float(probs.max(1).values.mean()),
        "coverage_tv": float(0.5 * (hist - ref.histogram).abs().sum()),
        "memorization": copy_share(torch.maximum(in_pixels, in_features), 1.0),
    }


BETTER = {"fd": "lower", "confidence": "higher", "coverage_tv": "lower", "memorization": "lower"}


def judge_file(root: Path, epochs: int) -> Path:
    """Where the judge trained for ``epochs`` on the set in ``root`` is cached."""
    return root / f"judge-v{JUDGE_VERSION}-e{epochs}.safetensors"


def load_or_train(root: Path, images: np.ndarray, labels: np.ndarray, num_labels: int, seed: int,
                  epochs: int = EPOCHS) -> tuple[Judge, bool]:
    """The cached judge in ``root`` (safetensors: no code is loaded), else a new one trained and saved; and
    whether it was trained now."""
    from safetensors.torch import load_file, save_file

    path = judge_file(root, epochs)
    judge = Judge(num_labels)
    if path.is_file():
        judge.load_state_dict(load_file(path))
        return judge.eval(), False
    judge = train_judge(images, labels, num_labels, seed=seed, epochs=epochs)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(judge.state_dict(), tmp, metadata={"seed": str(seed), "epochs": str(epochs)})
    tmp.replace(path)
    return judge, True


def weights_digest(judge: Judge) -> str:
    """A short digest of the judge's weights: FD values are comparable only between equal digests."""
    h = hashlib.sha256()
    for name, tensor in sorted(judge.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
