"""The memorization report's files: the training images read from a data folder, a cache of what is slow to
recompute (the leave-one-out distances), and ``nearest.png`` / ``memorization.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from . import descriptor
from .data import ImageFolderDataset, PackedDataset, build_dataset
from .errors import DataError, DdpmctlError
from .labeled import batch_images
from .memorization import (
    PIXEL_SIZE,
    REAL_MAX,
    SPACES,
    MemorizationResult,
    Neighbours,
    TrainingReference,
    build_reference,
    pixel_view,
)
from .prepare import IMAGES_DIR, read_manifest
from .sampling import save_png, tile

CACHE_FORMAT = 1
NEAREST_PNG = "nearest.png"
REPORT_JSON = "memorization.json"
MIN_TILE = 64  # nearest.png scales small images up (nearest-neighbour, by a whole factor) to at least this


def training_dataset(data_dir: str | Path, img_size: int) -> tuple[Dataset, str]:
    """The images in ``data_dir`` at ``img_size``: a raw folder, a prepared folder (packed or not), a .npy pack.

    As for training (data.build_dataset), except that a folder prepared at another size is not refused
    but read from its PNGs and resized.
    """
    root = Path(data_dir).expanduser()
    manifest = read_manifest(root) if root.is_dir() else None
    if manifest is not None and manifest.get("size") != img_size:
        folder = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
        dataset = ImageFolderDataset(folder, img_size)
        if len(dataset) == 0:
            raise DataError(f"--data {root} was prepared at {manifest.get('size')}px and holds no PNGs to resize to "
                            f"{img_size}px: pass the original folder of images")
        return dataset, f"{len(dataset)} images from {folder}, resized from {manifest.get('size')}px to {img_size}px"
    try:
        return build_dataset(root, img_size)
    except DataError as exc:  # its hints name train's --path-to-data / --img-size
        raise DataError(str(exc).replace("--path-to-data", "--data")) from None


def read_images(dataset: Dataset, batch_size: int = 256, num_workers: int = 2,
                on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Every image of ``dataset`` as uint8 (M, 3, s, s), s = min(S, PIXEL_SIZE), downsampled batch by batch."""
    if getattr(dataset, "in_process", False):
        num_workers = 0  # a memory-mapped pack: nothing to decode
    # A private generator: the loader would draw its base seed from the global RNG, which training's exact
    # resume depends on (the memorization check runs between steps).
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None), generator=torch.Generator())
    chunks, done = [], 0
    for batch in loader:
        images = batch_images(batch)  # a class-conditional set's batches carry labels
        chunks.append(pixel_view(images))
        done += images.shape[0]
        if on_progress is not None:
            on_progress(done, len(dataset))
    return torch.cat(chunks)


def reference_for_dataset(dataset: Dataset, img_size: int, device: torch.device | str | None = None,
                          num_workers: int = 0) -> TrainingReference:
    """The report's reference for a training dataset (data.build_dataset's), built once per run.

    For the training loop: build it once, then at each evaluation ``check_samples(to_uint8(images), ref)``
    gives ``.line()`` for the log and ``.metrics()`` for metrics.jsonl (a grid's few samples: well under
    a second against 10k 64 px images on a CPU).
    """
    if len(dataset) < 2:
        raise DataError(f"the training data holds {len(dataset)} image; the memorization report needs at least 2")
    return build_reference(read_images(dataset, num_workers=num_workers), device=device,
                           image=_full_size(dataset, img_size))


def _full_size(dataset: Dataset, img_size: int) -> Callable[[int], torch.Tensor] | None:
    """Training image i at full size for nearest.png, when the reference keeps smaller ones."""
    return (lambda i: batch_images(dataset[i])) if img_size > PIXEL_SIZE else None


def dataset_files(dataset: Dataset) -> list[Path]:
    """The files a dataset reads: what the cache key is made of."""
    if isinstance(dataset, PackedDataset):
        return [dataset.path]
    return list(getattr(dataset, "files", []))


def cache_key(files: list[Path], img_size: int) -> str:
    """Digest of what a reference depends on: the files (path, size, mtime), the size, the descriptor."""
    listing = []
    for f in files:
        st = f.stat()
        listing.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"format": CACHE_FORMAT, "descriptor": descriptor.VERSION, "pixel_size": PIXEL_SIZE,
                       "real_max": REAL_MAX, "img_size": img_size, "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    """~/.cache/ddpmctl/memorization (honours DDPMCTL_CACHE and XDG_CACHE_HOME)."""
    root = os.environ.get("DDPMCTL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ddpmctl")
    return Path(root).expanduser() / "memorization"


def load_reference(data_dir: str | Path, img_size: int, cache_dir: str | Path | None = None,
                   device: torch.device | str | None = None, num_workers: int = 2,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[TrainingReference, bool]:
    """The training images of ``data_dir`` as a reference for the report, and whether it came from the cache.

    The images are read every time (the report compares pixels); the descriptors and the leave-one-out
    distances are cached, keyed by the files' paths, sizes and modification times.
    """
    from safetensors.torch import load_file, save_file

    dataset, _ = training_dataset(data_dir, img_size)
    if len(dataset) < 2:
        raise DataError(f"--data {data_dir} holds {len(dataset)} image; the memorization report needs at least 2")
    images = read_images(dataset, num_workers=num_workers, on_progress=on_progress)
    full = _full_size(dataset, img_size)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / f"{cache_key(dataset_files(dataset), img_size)}.safetensors"
    if path.is_file():
        try:
            t = load_file(path)
            real = {s: Neighbours(*(t[f"real_{s}_{f}"] for f in ("distance", "index", "second", "view")))
                    for s in SPACES}
            if t["features"].shape[0] == images.shape[0]:
                return TrainingReference(images, t["features"], t["mirrored"], real, t["subset"], full), True
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    ref = build_reference(images, device=device, image=full)
    tensors = {"features": ref.features, "mirrored": ref.mirrored, "subset": ref.subset}
    for s in SPACES:
        for f in ("distance", "index", "second", "view"):
            tensors[f"real_{s}_{f}"] = getattr(ref.real[s], f)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"data_dir": str(data_dir)})
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the recomputation next time
        pass
    return ref, False


def report_dir(checkpoint: Path, step: int) -> Path:
    """Where evaluate writes nearest.png and memorization.json by default: RUN/evaluate/step_<N>."""
    return Path(checkpoint).parent / "evaluate" / f"step_{step}"


def nearest_grid(pairs: torch.Tensor, copies: list[bool], columns: int = 4) -> torch.Tensor:
    """uint8 (k, 2, 3, S, S) sample / training-image pairs -> one (3, H, W) float image in [-1, 1].

    Each pair sits side by side in a 2-pixel frame, red when the sample counts as a likely copy, white
    otherwise; pairs are tiled ``columns`` to a row in the order given (closest first).
    """
    k, _, c, s, _ = pairs.shape
    scale = max(1, -(-MIN_TILE // s))
    x = pairs.float() / 127.5 - 1
    if scale > 1:
        x = x.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    size = s * scale
    framed = []
    for i in range(k):
        gap = x.new_ones((c, size, 2))
        pair = torch.cat([x[i, 0], gap, x[i, 1]], -1)  # (3, size, 2 size + 2)
        colour = x.new_tensor([1.0, -1.0, -1.0] if copies[i] else [1.0, 1.0, 1.0]).view(3, 1, 1)
        frame = colour.expand(c, size + 4, 2 * size + 6).clone()
        frame[:, 2:-2, 2:-2] = pair
        framed.append(frame)
    return tile(torch.stack(framed), columns, pad=6)


def write_report(result: MemorizationResult, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write nearest.png (when the result kept pairs) and memorization.json into ``out_dir``; returns the folder."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if result.pairs is not None:
            grid = nearest_grid(result.pairs, [c["likely_copy"] for c in result.closest])
            result.nearest_png = str(save_png(grid, out / NEAREST_PNG))
        tmp = out / f".{REPORT_JSON}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({**(extra or {}), **result.to_dict()}, indent=2) + "\n")
        os.replace(tmp, out / REPORT_JSON)
    except OSError as exc:
        raise DdpmctlError(f"cannot write the memorization report into {out} ({exc.strerror or exc}): "
                           "pass --out with a folder you can write to") from None
    return out
