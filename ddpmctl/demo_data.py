"""The built-in demo data: procedurally drawn coloured shapes (discs, squares, triangles), optionally in class
folders. Nothing is downloaded: `make demo`, the tests and the benchmarks draw what they need."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(230, 57, 70), (241, 196, 15), (46, 204, 113), (52, 152, 219), (155, 89, 182), (236, 240, 241)]


DEMO_CLASSES = ("discs", "squares", "triangles")  # the shapes, in draw_demo_image's order


def draw_demo_image(rng: np.random.Generator, size: int, shape: int | None = None) -> Image.Image:
    """One procedurally drawn picture: a bold shape (disc, square or triangle) on a two-tone background.

    ``shape``: the index in DEMO_CLASSES to draw; None: a random one (the same random draws either way).
    """
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
    drawn = int(rng.integers(3))  # drawn even when the shape is given, so the random stream stays the same
    kind = drawn if shape is None else shape
    if kind == 0:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif kind == 1:
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    else:
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in
               (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        draw.polygon(pts, fill=color)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def make_demo_dataset(dst: str | Path, num_images: int = 2000, size: int = 32, seed: int = 0,
                      classes: int = 0) -> Path:
    """Write ``num_images`` demo PNGs into ``dst`` (skipped if already complete); returns ``dst``.

    ``classes`` (2 or 3): one folder per shape instead (discs/, squares/, triangles/: the first ``classes`` of
    DEMO_CLASSES), image i drawing shape i mod ``classes``: a class-conditional training set.
    """
    dst = Path(dst)
    names = DEMO_CLASSES[:classes]
    for name in names or [""]:
        (dst / name).mkdir(parents=True, exist_ok=True)
    if len(list(dst.glob("*/*.png" if names else "*.png"))) >= num_images:
        return dst
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        shape = i % len(names) if names else None
        folder = dst / names[shape] if names else dst
        draw_demo_image(rng, size, shape).save(folder / f"shape_{i:05d}.png")
    return dst
