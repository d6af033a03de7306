"""A fixed, hand-designed image descriptor for finding near-copies offline (no weights, no download).

Why this and not a network's features: the memorization report has to work on every machine, offline,
and give the same numbers everywhere. Inception features need a 92 MB download that evaluate cannot
assume (and a report that changed with whether a file happens to be present could not be compared);
a random-weight conv net is not reproducible, since torch's random initialisation differs across
versions. A descriptor made of a few fixed operations is exact across versions and devices, costs
under a millisecond per image on a CPU, and targets what pixel L2 gets wrong about copies:

- small shifts: the luminance is blurred (a Gaussian of 1.5 px on a 32 x 32 working copy) and every
  part is pooled over cells; the blur also keeps sampling noise out of the gradients;
- brightness, contrast and colour changes: structure is carried by luminance with its mean and norm
  removed, and by gradient orientations (unsigned, so a recoloured shape whose contrast against the
  background reverses keeps its edges); colour itself enters only as a few lightly weighted moments;
- mirror images are handled by the caller, which also compares against each reference's mirror image.

The parts (the "tiny image" of Torralba et al. 2008; orientation histograms after Dalal & Triggs 2005)
are each scaled to unit norm (colour moments lie in [0, 1]) and weighted, so Euclidean distances
between descriptors stay under 2.7. The settings were chosen by measurement
(benchmarks/memorization_descriptor.py; table in docs/memorization.md): against 1,000 training images
of four synthetic families, the descriptor catches copies that pixels miss (channel-swapped colours:
26-42% under the threshold where pixels give 2-4%; 3-4 px shifts of 1/f-noise images: 53% against 3%),
and pixels catch some it misses (1 px shifts of flat shapes, noisy near-uniform images), so the report
uses both; fresh images from the same generators stay at the 5% floor in each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VERSION = 1  # part of the cache key: bump when the descriptor changes
WORK_SIZE = 32  # images are compared at this resolution (area-resized): cheap, and tolerant of detail noise
BLUR = 1.5  # Gaussian sigma (working pixels) on the luminance: shift and noise tolerance (beat 0.7 and 1.0)
TINY = 8  # the low-resolution luminance is TINY x TINY
CELLS = 4  # orientation histograms on a CELLS x CELLS grid
BINS = 8  # unsigned orientations in [0, pi)
WEIGHTS = (1.0, 1.0, 0.5)  # tiny luminance, orientation histograms, colour moments
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with edge replication."""
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-t.square() / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def describe(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> float32 (N, 145) descriptors on the same device."""
    x = _resize(images.float() / 255, WORK_SIZE)  # (N, 3, 32, 32)
    luma = _blur((x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True), BLUR)  # (N, 1, 32, 32)
    n = x.shape[0]

    # 1. the tiny image: 8 x 8 luminance, mean removed and scaled to unit norm (brightness/contrast free)
    tiny = F.adaptive_avg_pool2d(luma, TINY).flatten(1)
    tiny = _unit(tiny - tiny.mean(1, keepdim=True))  # (N, 64)

    # 2. orientation histograms: central-difference gradients, each pixel's magnitude split between the
    # two nearest of BINS unsigned orientations, pooled into CELLS x CELLS cells, unit norm (measured: a
    # square root as in RootSIFT lets the weak gradients of noise count too much)
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    magnitude = (gx.square() + gy.square()).sqrt()  # (N, 1, 32, 32)
    angle = torch.atan2(gy, gx).remainder(math.pi) / (math.pi / BINS)  # in [0, BINS)
    low = angle.floor()
    frac = angle - low
    low = low.long() % BINS
    hist = torch.zeros((n, BINS, WORK_SIZE, WORK_SIZE), device=x.device)
    hist.scatter_add_(1, low, magnitude * (1 - frac))
    hist.scatter_add_(1, (low + 1) % BINS, magnitude * frac)
    hog = _unit(F.adaptive_avg_pool2d(hist, CELLS).flatten(1))  # (N, 128)

    # 3. colour moments: mean and standard deviation of each channel, lightly weighted
    colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)  # (N, 6), each in [0, 1]
    w_tiny, w_hog, w_colour = WEIGHTS
    return torch.cat([w_tiny * tiny, w_hog * hog, w_colour * colour], dim=1)


def describe_mirrored(images: torch.Tensor) -> torch.Tensor:
    """The descriptors of the images' left-right mirror images (training flips them at random)."""
    return describe(images.flip(-1))
