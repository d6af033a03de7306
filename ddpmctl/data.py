"""Training data: image-folder dataset, a resumable (and distributed) sampler, loaders, built-in demo data.

Datasets return uint8 (3, H, W) tensors; conversion to float, scaling to [-1, 1] and the random flip
happen on the training device, so workers only decode and the host-to-device copy is 4x smaller.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive, any extension case), sorted for a stable order."""
    root = Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    return sorted(files)


def load_rgb(path: Path) -> Image.Image:
    """Open an image the right way up as RGB (first frame of animations; transparency onto white)."""
    with Image.open(path) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` with antialiasing, then cut the centre square."""
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC, reducing_gap=3.0)


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images under a folder, decoded and resized to ``img_size`` on the fly; uint8 (3, S, S) items."""

    def __init__(self, root: str | Path, img_size: int):
        self.root = Path(root)
        self.img_size = img_size
        self.files = find_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> torch.Tensor:
        # A broken file must not stop a long run: use the next readable image instead (deterministic).
        for attempt in range(min(len(self.files), 16)):
            path = self.files[(idx + attempt) % len(self.files)]
            try:
                im = load_rgb(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=1)
                continue
            if im.size != (self.img_size, self.img_size):
                im = resize_center_crop(im, self.img_size)
            return pil_to_uint8(im)
        raise DataError(f"no readable image near {self.files[idx]}; run 'ddpmctl prepare' to find the broken files")


def build_dataset(path: str | Path | None, img_size: int) -> tuple[Dataset, str]:
    """The training dataset for ``path`` and a one-line description of how it is read."""
    if not path:
        raise DataError("no training data given: pass --path-to-data DIR (a folder of images)")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: pass --path-to-data with a folder of images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass --path-to-data with a folder of images")
    dataset = ImageFolderDataset(root, img_size)
    if len(dataset) == 0:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    return dataset, f"{len(dataset)} images from {root}, resized to {img_size}px on the fly"


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way through, so a resumed run sees no batch twice.

    The order of epoch e is a permutation seeded by (seed, e), as in DistributedSampler; ``start``
    skips the first ``start`` indices this rank would have drawn in that epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # only the first epoch after a resume is partial
        return iter(indices[start:])

    def __len__(self) -> int:
        return self.num_samples


class BatchStream:
    """Endless iterator over batches that tracks (epoch, samples taken in the epoch) for exact resume."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        self.batch_size = batch_size
        # A private generator keeps the loader from drawing worker seeds out of the global RNG.
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, drop_last=False, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed),
        )
        self.epoch = 0
        self.position = 0  # samples of this rank's share of the epoch already returned
        self._it: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._it = None

    def __next__(self) -> torch.Tensor:
        while True:
            if self._it is None:
                if self.position >= self.sampler.num_samples:
                    self.epoch, self.position = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.position)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch, self.position = self.epoch + 1, 0
                continue
            self.position += batch.shape[0]
            return batch

    def __iter__(self) -> BatchStream:
        return self

    def close(self) -> None:
        self._it = None
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


# ----------------------------------------------------------------------------- built-in demo data

PALETTE = [(230, 57, 70), (241, 196, 15), (46, 204, 113), (52, 152, 219), (155, 89, 182), (236, 240, 241)]


def draw_demo_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One procedurally drawn picture: a bold shape (circle, square or triangle) on a two-tone background."""
    scale = 4  # draw large, then downsample, for antialiased edges
    s = size * scale
    top = tuple(int(c) for c in rng.integers(10, 90, size=3))
    bottom = tuple(int(c) for c in rng.integers(10, 90, size=3))
    ramp = np.linspace(0, 1, s)[:, None, None]
    bg = (np.array(top)[None, None] * (1 - ramp) + np.array(bottom)[None, None] * ramp).repeat(s, axis=1)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    color = PALETTE[int(rng.integers(len(PALETTE)))]
    radius = s * rng.uniform(0.22, 0.34)
    cx, cy = s * rng.uniform(0.38, 0.62), s * rng.uniform(0.38, 0.62)
    kind = int(rng.integers(3))
    if kind == 0:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif kind == 1:
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    else:
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in
               (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        draw.polygon(pts, fill=color)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def make_demo_dataset(dst: str | Path, num_images: int = 2000, size: int = 32, seed: int = 0) -> Path:
    """Write ``num_images`` demo PNGs into ``dst`` (skipped if already complete); returns ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if len(list(dst.glob("*.png"))) >= num_images:
        return dst
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        draw_demo_image(rng, size).save(dst / f"shape_{i:05d}.png")
    return dst
