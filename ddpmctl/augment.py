"""Non-leaking augmentation (Karras et al. 2022, EDM, Sec. 5 and App. F.2): pure tensor functions, on the device.

Each augmentation is applied to an image with probability p, and the network is told which one was applied,
and how, through a vector of ``AUGMENT_DIM`` numbers (the model's ``augment_embedding``). Sampling passes no
vector (zeros: "not augmented"), so the augmentations do not leak into the samples even when p is large: the
network learns the augmented images as a different, labelled distribution. Every random number is drawn from
the torch generator whatever p is, so a run with augmentation repeats (and resumes) exactly.

Unlike ``random_flip`` (a plain flip of half the images, which does leak: the samples come out mirrored as
often as the data were), these also rotate and shift the images and change their colours, which a
generator must not learn to reproduce.
"""

from __future__ import annotations

import torch

AUGMENT_DIM = 7  # x-flip 1, rotation 2, translation 2, brightness 1, saturation 1
TRANSLATE_MAX = 0.125  # largest shift, as a share of the image side (EDM's translate_int_max)
BRIGHTNESS_STD = 0.2  # standard deviation of the brightness offset in [-1, 1] units (EDM's brightness_std)
SATURATION_STD = 1.0  # standard deviation of the log2 saturation factor (EDM's saturation_std)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside 0..size-1 mirrored back inside (reflect padding without repeating the edge pixel)."""
    period = 2 * size - 2
    return size - 1 - (size - 1 - index % period).abs()


def augment(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (B, C, S, S) images in [-1, 1]: (augmented images, (B, AUGMENT_DIM) float labels, zero if untouched).

    In order, each with probability ``p``: a horizontal flip (of half of those), a rotation by 90, 180 or 270
    degrees, an integer shift of up to 1/8 of the side with mirrored borders, a brightness offset and a
    saturation factor around each pixel's grey value. The labels follow EDM's augment.py.
    """
    n, _, h, w = x.shape
    dev = x.device

    def chosen(*shape: int) -> torch.Tensor:
        return torch.rand(shape, device=dev) < p

    # 1. Horizontal flip.
    flip = torch.randint(2, (n,), device=dev) * chosen(n)
    x = torch.where(flip.view(-1, 1, 1, 1) == 1, x.flip(3), x)
    # 2. Rotation by k quarter turns (square images): flips and a transpose.
    k = (torch.randint(3, (n,), device=dev) + 1) * chosen(n)
    kk = k.view(-1, 1, 1, 1)
    x = torch.where((kk == 1) | (kk == 2), x.flip(3), x)
    x = torch.where((kk == 2) | (kk == 3), x.flip(2), x)
    x = torch.where((kk == 1) | (kk == 3), x.transpose(2, 3), x)
    # 3. Integer translation, mirrored at the borders: out[y, x] = in[y - ty, x - tx].
    shift = (torch.rand(2, n, device=dev) * 2 - 1) * chosen(1, n)
    tx = (shift[0] * w * TRANSLATE_MAX).round().long()
    ty = (shift[1] * h * TRANSLATE_MAX).round().long()
    cols = _reflect(torch.arange(w, device=dev)[None] - tx[:, None], w)  # (B, W)
    rows = _reflect(torch.arange(h, device=dev)[None] - ty[:, None], h)  # (B, H)
    x = x.gather(3, cols[:, None, None, :].expand_as(x))
    x = x.gather(2, rows[:, None, :, None].expand_as(x))
    # 4. Brightness: the same offset on every channel.
    bright = torch.randn(n, device=dev) * chosen(n)
    x = x + (bright * BRIGHTNESS_STD).view(-1, 1, 1, 1)
    # 5. Saturation: scale each pixel's distance from its grey value (the mean of its channels).
    sat = torch.randn(n, device=dev) * chosen(n)
    grey = x.mean(dim=1, keepdim=True)
    x = x + (x - grey) * (torch.exp2(sat * SATURATION_STD) - 1).view(-1, 1, 1, 1)  # untouched: exactly x
    labels = torch.stack([flip.float(), ((k == 1) | (k == 2)).float(), ((k == 2) | (k == 3)).float(),
                          tx / (w * TRANSLATE_MAX), ty / (h * TRANSLATE_MAX), bright, sat], dim=1)
    return x, labels.float()
