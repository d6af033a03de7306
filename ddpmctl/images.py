"""Finding images in a folder and turning one image into a square RGB array: shared by `ddpmctl prepare`
and by training straight from a folder of images.

Any mode Pillow reads (16-bit, palette, CMYK, with alpha, with an ICC profile) becomes 8-bit sRGB RGB;
EXIF orientation is applied; the square comes from a centre crop or from padding.
"""

from __future__ import annotations

import io
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CROPS = ("center", "pad")
# JPEGs are decoded at a reduced DCT scale that stays at least this many times the target size, then
# Lanczos-resized: the same trade as Pillow's thumbnail(), invisible in quality and several times faster.
DRAFT_GAP = 2.0


def find_images(root: str | Path, exclude: Path | None = None) -> list[Path]:
    """Every image file under ``root`` (recursive, any extension case, hidden entries skipped), sorted."""
    root = Path(root)
    exclude = exclude.resolve() if exclude is not None else None
    files = []
    seen: set[str] = set()  # real paths of visited folders: a symlink loop is walked once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (Path(dirpath) / d).resolve() != exclude))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(Path(dirpath) / name)
    return sorted(files)


# ----------------------------------------------------------------------------- conversion of one image


def parse_color(value: str) -> tuple[int, int, int]:
    """'white', '#808080' or '128,128,128' -> an RGB triple (DataError if not a colour)."""
    try:
        if "," in value:
            rgb = tuple(int(v) for v in value.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(value)
            return rgb  # type: ignore[return-value]
        return ImageColor.getrgb(value)[:3]  # type: ignore[return-value]
    except ValueError:
        raise DataError(f"--background {value!r} is not a colour: use a name (white), #rrggbb or r,g,b") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth modes (16-bit, 32-bit int, float) -> L with the tones scaled, not clipped to white."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float32)
        # "I;16" is 16-bit by definition; "I" (32-bit) holds 16-bit data when it comes from a 16-bit file.
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = a * (255.0 / top)
    elif im.mode == "F":
        a = np.asarray(im).astype(np.float32)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a  # float images are 0..1 or 0..255
    else:
        return im
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


@lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from an embedded profile to sRGB (None when the profile is sRGB already); cached per profile."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    name = ImageCms.getProfileDescription(src) or ""
    if "srgb" in name.lower().replace(" ", "") or src.profile.xcolor_space.strip() not in ("RGB", "CMYK"):
        return None  # most cameras embed sRGB itself; grey and other spaces are left to Pillow's conversion
    out = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(src, ImageCms.createProfile("sRGB"), mode, out)


def to_srgb(im: Image.Image) -> Image.Image:
    """Convert pixels stored in an embedded ICC colour space (Display P3, Adobe RGB, a CMYK press profile) to sRGB.

    The network sees numbers, not colours: without this, photos from phones that shoot Display P3
    would train as duller, shifted sRGB. A profile that cannot be read leaves the pixels as they are.
    """
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    try:
        transform = _srgb_transform(icc, im.mode)
        return im if transform is None else ImageCms.applyTransform(im, transform)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any mode -> sRGB RGB; transparent pixels are composited onto ``background`` (not turned black)."""
    im = to_srgb(_to_8bit(im))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info) \
            or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
        base = Image.new("RGBA", im.size, (*background, 255))
        return Image.alpha_composite(base, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")  # L, P, 1, CMYK (Pillow undoes Adobe inversion), YCbCr


def _target(w: int, h: int, size: int, crop: str) -> tuple[int, int]:
    """Scaled size before the crop (center: shorter side = size) or before the pad (pad: longer side = size)."""
    scale = size / (min(w, h) if crop == "center" else max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def square(im: Image.Image, size: int, crop: str = "center", background: tuple[int, int, int] = (255, 255, 255),
           fast: bool = False) -> Image.Image:
    """An RGB image -> exactly size x size: scale (antialiased; Lanczos, or bicubic if fast), then crop or pad."""
    tw, th = _target(im.width, im.height, size, crop)
    if (tw, th) != im.size:
        resample = Image.Resampling.BICUBIC if fast else Image.Resampling.LANCZOS
        im = im.resize((tw, th), resample, reducing_gap=3.0)
    if crop == "center":
        left, top = (tw - size) // 2, (th - size) // 2
        return im.crop((left, top, left + size, top + size)) if (tw, th) != (size, size) else im
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(im, ((size - tw) // 2, (size - th) // 2))
    return canvas


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open lazily; Pillow's decompression-bomb limit is enforced (over it is an error, not a warning)."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def is_small(w: int, h: int, size: int, crop: str) -> bool:
    """True if the image must be enlarged to fill size x size under ``crop``."""
    return (min(w, h) if crop == "center" else max(w, h)) < size


def load_square(source: str | Path | bytes | Image.Image, size: int, crop: str = "center",
                background: tuple[int, int, int] = (255, 255, 255), fast: bool = False) -> Image.Image:
    """Decode a file the right way up (EXIF orientation, first frame) into an RGB size x size image.

    ``fast`` (training on an unprepared folder): JPEGs decode at the smallest DCT scale that still
    covers the target and resizing is bicubic; otherwise (prepare) quality comes first.
    """
    im = source if isinstance(source, Image.Image) else open_image(source)
    try:
        if im.format in ("JPEG", "MPO"):  # MPO: the JPEG variant many phones write
            # Request a reduced DCT decode that keeps `gap` x the target size (orientation-independent:
            # the request is proportional to the stored width and height).
            gap = 1.0 if fast else DRAFT_GAP
            tw, th = _target(im.width, im.height, size, crop)
            if tw * gap < im.width:
                im.draft(None, (int(tw * gap), int(th * gap)))
        im.load()  # full decode: truncated data is an error here (LOAD_TRUNCATED_IMAGES stays False)
        oriented = ImageOps.exif_transpose(im)
        return square(to_rgb(oriented, background), size, crop, background, fast)
    finally:
        if im is not source:
            im.close()


def describe_error(exc: BaseException) -> str:
    """A short reason for the report, for an exception raised while reading an image."""
    text = str(exc).strip()
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb refused: {text}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (unknown format or damaged header)"
    if isinstance(exc, OSError) and exc.errno is not None:  # permission denied, broken link, I/O error
        return f"unreadable: {exc.strerror or text}"
    if isinstance(exc, OSError) and "truncated" in text:
        return f"truncated file: {text}"
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)):
        return f"damaged or unsupported image: {text or type(exc).__name__}"
    return f"{type(exc).__name__}: {text}"
