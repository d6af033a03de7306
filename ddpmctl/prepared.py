"""A prepared folder as data: its manifest, the order of its images and the packed array. Read by training
(data.py) and written by ``ddpmctl prepare`` (prepare.py).

Layout of a prepared folder DST::

    DST/manifest.json    # settings, and per source: output file, size, mtime, SHA-256 of source and output
    DST/report.txt       # what was skipped and why, which images were smaller than N
    DST/images/...       # one N x N RGB PNG per usable source, mirroring SRC's sub-folders
    DST/packed.npy       # optional: every image in one uint8 (count, 3, N, N) array, memory-mapped by training
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError
from .files import atomic_path, write_text_atomic
from .images import describe_error

MANIFEST = "manifest.json"
REPORT = "report.txt"
IMAGES_DIR = "images"
PACK_FILE = "packed.npy"
FORMAT = "ddpmctl-prepared"
VERSION = 2  # 2: embedded ICC colour profiles converted to sRGB (version 1 sets are converted again once)


def read_manifest(dst: str | Path) -> dict[str, Any] | None:
    """The manifest of a prepared folder, or None if ``dst`` holds none (DataError if it is damaged)."""
    path = Path(dst) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is damaged ({exc}): delete it and run 'ddpmctl prepare' again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("images"), dict):
        raise DataError(f"{path} is not a ddpmctl manifest: delete it or use another folder")
    return manifest


def write_manifest(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, separators=(",", ":")))  # compact: ~250 bytes per image


def pack_digest(manifest: dict[str, Any]) -> str:
    """Fingerprint of the ordered outputs: a packed array is fresh only while this matches."""
    h = hashlib.sha256(str(manifest["size"]).encode())
    for rel in sorted(manifest["images"]):
        h.update(manifest["images"][rel]["out_sha256"].encode())
    return h.hexdigest()


def prepared_files(dst: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """The output PNGs of a prepared folder in manifest (sorted source) order: the order of the packed array."""
    dst = Path(dst)
    return [dst / manifest["images"][rel]["file"] for rel in sorted(manifest["images"])]


def write_pack(dst: Path, manifest: dict[str, Any], progress: Callable[[int, int], None]) -> int:
    """Write DST/packed.npy from the prepared images, in manifest order; returns the image count."""
    files = prepared_files(dst, manifest)
    size = manifest["size"]
    with atomic_path(dst / PACK_FILE) as tmp:
        # (count, 3, N, N): channel-first like the dataset items, so a batch is one slice with no transpose.
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
        for i, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
                del arr  # unmapped before atomic_path removes the file
                raise DataError(f"prepared image {f} is damaged or unreadable ({describe_error(exc)}): delete it "
                                "and run 'ddpmctl prepare' again to rewrite it") from None
            if a.shape != (size, size, 3):
                del arr
                raise DataError(f"{f} is {a.shape[1]}x{a.shape[0]}, not {size}x{size}: run 'ddpmctl prepare' again")
            arr[i] = a.transpose(2, 0, 1)
            if i % 256 == 0 or i == len(files) - 1:
                progress(i + 1, len(files))
        arr.flush()
        del arr
    return len(files)
