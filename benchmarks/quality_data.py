"""The quality benchmark's image set: labelled 32 px scenes drawn with numpy + Pillow from a seed (no download).

Each image holds, on a two-colour gradient background with a soft light spot:

* one **main object**, large (a third to two thirds of the width), randomly rotated: a disc, a square or a
  triangle, filled with a two-colour **texture**: stripes (period 3.5-5.5 px, any angle), checks (cells of
  2-3 px, any angle) or dots (a grid of 1-2 px dots), sometimes with a dark outline;
* 2-4 small solid **distractors** (discs, squares, triangles, rings, crosses of 3-7 px) behind it;
* 1-3 **small details** on top: specks of 1-2 px and thin line segments.

The label is the main object's kind x its texture (9 labels, e.g. ``square-checks``): a generator gets it
right only if the large shape is globally coherent *and* its fine texture survives. Every label and
every drawing choice is invariant under a left-right flip (ddpmctl trains with random flips).

Drawn at 4x (128 px) and Lanczos-downsampled to 32 px, so edges and textures are antialiased. The set is
``train`` (the diffusion model and the judge train on it), ``ref`` (held-out reference for the scores)
and ``val`` (other held-out images: the real floor), written as PNG folders plus packed uint8 arrays
(``<split>.npy``, (N, 3, 32, 32); ddpmctl trains from ``train.npy`` directly) and ``manifest.json``
(labels, written last: a folder without it is regenerated).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1  # bump when the drawing changes: the folder name (and so every cached judge) changes with it
SIZE = 32
SCALE = 4  # supersampling factor
KINDS = ("disc", "square", "triangle")
TEXTURES = ("stripes", "checks", "dots")
LABELS = tuple(f"{k}-{t}" for k in KINDS for t in TEXTURES)
SPLITS = {"train": 4000, "ref": 1000, "val": 1000}  # default sizes; the split seeds are independent of them
_SPLIT_STREAM = {"train": 0, "ref": 1, "val": 2}


# ----------------------------------------------------------------------------- drawing


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] -> RGB float (3,) in [0, 1]."""
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _frame(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates in a frame centred at (cx, cy) and rotated by ``angle``."""
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def shape_mask(kind: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (S, S) mask of a shape of circumradius-like size ``r`` (areas roughly comparable)."""
    u, v = _frame(xx, yy, cx, cy, angle)
    if kind == "disc":
        return u * u + v * v <= r * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82 * r
    if kind == "triangle":  # equilateral, circumradius 1.2 r: inside all three edges (each at 0.6 r from the centre)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = -math.pi / 2 + 2 * math.pi * k / 3
            inside &= -(u * math.cos(a) + v * math.sin(a)) <= 0.6 * r
        return inside
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape {kind!r}")


def texture_mask(texture: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean (S, S) pattern: where the texture's second colour goes. Periods in supersampled pixels."""
    angle = rng.uniform(0, math.pi)
    u, v = _frame(xx, yy, rng.uniform(0, 64), rng.uniform(0, 64), angle)  # random phase and angle
    if texture == "stripes":
        period = rng.uniform(3.5, 5.5) * SCALE
        return (u / period) % 1.0 < 0.5
    if texture == "checks":
        cell = rng.uniform(2.0, 3.0) * SCALE
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    if texture == "dots":
        period = rng.uniform(4.0, 5.5) * SCALE
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return fu * fu + fv * fv <= 0.3**2
    raise ValueError(f"unknown texture {texture!r}")


def draw_image(rng: np.random.Generator, label: int) -> Image.Image:
    """One 32 px RGB scene whose main object is ``LABELS[label]`` (see the module docstring)."""
    s = SIZE * SCALE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    kind, texture = KINDS[label // len(TEXTURES)], TEXTURES[label % len(TEXTURES)]

    # Background: a two-colour linear gradient at a random angle, plus a soft light spot.
    c1 = _hsv(rng.uniform(), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.85))
    c2 = _hsv(rng.uniform(), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.85))
    u, _ = _frame(xx, yy, s / 2, s / 2, rng.uniform(0, 2 * math.pi))
    ramp = np.clip(u / s + 0.5, 0, 1)[..., None]
    img = c1 * (1 - ramp) + c2 * ramp
    lx, ly, lr = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.3, 0.7) * s
    spot = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * lr * lr))[..., None]
    img = img + rng.uniform(0.0, 0.25) * spot

    # Main object's place first, so the distractors can stay out of its middle (they sit behind it).
    r = rng.uniform(0.18, 0.3) * s
    cx, cy = rng.uniform(0.36, 0.64) * s, rng.uniform(0.36, 0.64) * s
    for _ in range(int(rng.integers(2, 5))):
        dkind = ("disc", "square", "triangle", "ring", "cross")[int(rng.integers(5))]
        dr = rng.uniform(0.05, 0.11) * s
        for _try in range(10):  # away from the main object's centre, so it stays the main object
            dx, dy = rng.uniform(0.08, 0.92) * s, rng.uniform(0.08, 0.92) * s
            if math.hypot(dx - cx, dy - cy) > 0.8 * r:
                break
        colour = _hsv(rng.uniform(), rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0))
        img[shape_mask(dkind, xx, yy, dx, dy, dr, rng.uniform(0, 2 * math.pi))] = colour

    # The main object: base colour, texture colour (dark, or the complementary hue), optional outline.
    hue = rng.uniform()
    base = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.65, 1.0))
    second = (_hsv(hue, rng.uniform(0.4, 1.0), rng.uniform(0.08, 0.3)) if rng.uniform() < 0.5
              else _hsv((hue + 0.5) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)))
    angle = rng.uniform(0, 2 * math.pi)
    if rng.uniform() < 0.5:
        img[shape_mask(kind, xx, yy, cx, cy, r + 1.5 * SCALE, angle)] = _hsv(rng.uniform(), 0.3, 0.08)
    inside = shape_mask(kind, xx, yy, cx, cy, r, angle)
    pattern = texture_mask(texture, xx, yy, rng)
    img[inside & ~pattern] = base
    img[inside & pattern] = second

    # Small details on top: specks and thin line segments.
    for _ in range(int(rng.integers(1, 4))):
        colour = _hsv(rng.uniform(), rng.uniform(0, 1), rng.choice([0.05, 1.0]))
        px, py = rng.uniform(0.05, 0.95) * s, rng.uniform(0.05, 0.95) * s
        if rng.uniform() < 0.5:
            img[(xx - px) ** 2 + (yy - py) ** 2 <= (rng.uniform(0.5, 1.0) * SCALE) ** 2] = colour
        else:
            u, v = _frame(xx, yy, px, py, rng.uniform(0, math.pi))
            img[(np.abs(v) <= 0.5 * SCALE) & (np.abs(u) <= rng.uniform(2, 5) * SCALE)] = colour

    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def draw_split(seed: int, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images of ``split``: uint8 (N, 3, 32, 32) and labels (N,), a function of (seed, split) only.

    Image i draws from its own generator seeded by (seed, split, i), so a larger set starts with the
    images of a smaller one.
    """
    images = np.empty((count, 3, SIZE, SIZE), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_STREAM[split], i])
        labels[i] = int(rng.integers(len(LABELS)))
        images[i] = np.asarray(draw_image(rng, int(labels[i]))).transpose(2, 0, 1)
    return images, labels


# ----------------------------------------------------------------------------- the cached folder


@dataclass
class ImageSet:
    root: Path
    seed: int
    images: dict[str, np.ndarray]  # split -> uint8 (N, 3, 32, 32)
    labels: dict[str, np.ndarray]  # split -> int64 (N,)
    generated: bool  # drawn now (False: read from the cache)

    def path(self, split: str) -> Path:
        """The PNG folder of ``split``."""
        return self.root / split


def folder_name(seed: int, sizes: dict[str, int]) -> str:
    """data-v<VERSION>-<seed>, with the split sizes appended when they are not the default ones."""
    name = f"data-v{VERSION}-{seed}"
    return name if sizes == SPLITS else name + "-" + "x".join(str(sizes[k]) for k in SPLITS)


def load_or_make(base: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> ImageSet:
    """The image set under ``base``/data-v<VERSION>-<seed>/, drawn and written first if it is missing."""
    sizes = dict(sizes or SPLITS)
    root = Path(base) / folder_name(seed, sizes)
    manifest = root / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta.get("version") == VERSION and meta.get("sizes") == sizes:
            images = {k: np.load(root / f"{k}.npy") for k in SPLITS}
            labels = {k: np.asarray(meta["labels"][k], dtype=np.int64) for k in SPLITS}
            return ImageSet(root, seed, images, labels, generated=False)
    if root.exists():
        shutil.rmtree(root)  # an interrupted earlier write (no manifest): start it over
    root.mkdir(parents=True)
    images, labels = {}, {}
    for split, count in sizes.items():
        images[split], labels[split] = draw_split(seed, split, count)
        (root / split).mkdir()
        for i, (pixels, label) in enumerate(zip(images[split], labels[split], strict=True)):
            Image.fromarray(pixels.transpose(1, 2, 0), "RGB").save(root / split / f"{i:05d}_{LABELS[label]}.png")
        np.save(root / f"{split}.npy", images[split])
    manifest.write_text(json.dumps({
        "version": VERSION, "seed": seed, "sizes": sizes, "label_names": list(LABELS),
        "labels": {k: v.tolist() for k, v in labels.items()},
    }))
    return ImageSet(root, seed, images, labels, generated=True)


def read_png_folder(folder: str | Path, size: int = SIZE) -> np.ndarray:
    """Every image under ``folder`` (sorted; contact sheets ``samples.png``/``progression.png`` skipped) as
    uint8 (N, 3, size, size), centre-cropped and resized if needed."""
    from ddpmctl.errors import DataError
    from ddpmctl.images import find_images, load_square

    files = [f for f in find_images(folder) if f.name not in ("samples.png", "progression.png")]
    if not files:
        raise DataError(f"no images found in {folder}")
    return np.stack([np.asarray(load_square(f, size)).transpose(2, 0, 1) for f in files])
