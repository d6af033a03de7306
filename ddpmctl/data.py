"""Training data: datasets (raw image folder, prepared folder, packed array), a resumable (and distributed)
sampler, loaders, built-in demo data.

Datasets return uint8 (3, H, W) tensors; conversion to float, scaling to [-1, 1] and the random flip
happen on the training device, so workers only decode and the host-to-device copy is 4x smaller.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .errors import DataError, DdpmctlWarning
from .images import IMAGE_EXTENSIONS, describe_error, find_images, is_small, load_square, open_image
from .labeled import batch_images, with_labels
from .prepared import PACK_FILE, pack_digest, prepared_files, read_manifest

# Scanning and conversion (images.py) are shared with `ddpmctl prepare`.


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images under a folder, decoded and resized to ``img_size`` on the fly; uint8 (3, S, S) items."""

    def __init__(self, root: str | Path, img_size: int):
        self.root = Path(root)
        self.img_size = img_size
        self.files = find_images(self.root)
        self.unreadable: set[Path] = set()  # files that failed to decode here (each worker keeps its own)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> torch.Tensor:
        # A broken file must not stop a long run: use the next readable image instead (deterministic).
        for attempt in range(min(len(self.files), 16)):
            path = self.files[(idx + attempt) % len(self.files)]
            try:
                # Same conversion as `ddpmctl prepare` (EXIF, 16-bit, alpha), with the reduced JPEG decode.
                return pil_to_uint8(load_square(path, self.img_size, "center", fast=True))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                if path not in self.unreadable:  # once per file and process, not at every epoch
                    self.unreadable.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({describe_error(exc)}); 'ddpmctl prepare' "
                                  "lists every broken file once", DdpmctlWarning, stacklevel=1)
        raise DataError(f"no readable image near {self.files[idx]}; run 'ddpmctl prepare' to find the broken files")


class PreparedDataset(Dataset):
    """The PNGs of a prepared folder (already img_size x img_size RGB): decode only, no resize."""

    def __init__(self, files: list[Path], img_size: int):
        self.files = files
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> torch.Tensor:
        try:
            with Image.open(self.files[idx]) as im:
                if im.mode != "RGB":
                    im = im.convert("RGB")
                a = np.asarray(im)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise DataError(f"prepared image {self.files[idx]} is damaged or unreadable ({describe_error(exc)}): "
                            "delete it and run 'ddpmctl prepare' again with the same SRC and DST to "
                            "rewrite it") from None
        if a.shape != (self.img_size, self.img_size, 3):
            raise DataError(f"{self.files[idx]} is {a.shape[1]}x{a.shape[0]}, not {self.img_size}x{self.img_size}: "
                            "the prepared folder was changed by hand; run 'ddpmctl prepare' again")
        return torch.from_numpy(a.transpose(2, 0, 1).copy())


class PackedDataset(Dataset):
    """A packed uint8 (count, 3, S, S) .npy array, memory-mapped: no decoding at all during training.

    ``__getitems__`` (used by DataLoader for a whole batch) reads the batch with one fancy-indexing
    gather from the page cache instead of one Python call per image. A gather costs well under a
    millisecond, less than handing a batch over from a worker process, so BatchStream reads a packed
    array in the training process (``in_process``) whatever --num-workers says.
    """

    in_process = True

    def __init__(self, path: str | Path, img_size: int):
        self.path = Path(path)
        self.img_size = img_size
        self._array: np.ndarray | None = None
        shape = self.array.shape
        if self.array.dtype != np.uint8 or len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
            raise DataError(f"{self.path} is not a packed image array (want uint8 (count, 3, S, S), found "
                            f"{self.array.dtype} {shape}): pack it with 'ddpmctl prepare --pack'")
        if shape[2] != img_size:
            raise DataError(f"{self.path} holds {shape[2]}px images but --img-size is {img_size}: train with "
                            f"--img-size {shape[2]}, or prepare a {img_size}px set with 'ddpmctl prepare --size {img_size}'")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # opened lazily, so each DataLoader worker maps the file itself
            try:
                self._array = np.load(self.path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read {self.path} as a packed image array ({type(exc).__name__}): "
                                "write it with 'ddpmctl prepare --pack'") from None
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # never pickle the mapped data into workers

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, idx: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[idx]))

    def __getitems__(self, indices: list[int]) -> PackedBatch:
        batch = torch.from_numpy(self.array[np.asarray(indices, dtype=np.int64)])  # (B, 3, S, S), one gather
        return PackedBatch(batch)

    @staticmethod
    def collate_fn(items: list) -> torch.Tensor:
        """Collate for DataLoader: a gathered batch is already one tensor (no per-image stack)."""
        return items.batch if isinstance(items, PackedBatch) else default_collate(items)


class PackedBatch(list):
    """The images of a gathered batch as a list of views (so default_collate still works) plus the whole tensor."""

    def __init__(self, batch: torch.Tensor):
        super().__init__(batch.unbind(0))
        self.batch = batch


def _prepared_dataset(root: Path, manifest: dict, img_size: int) -> tuple[Dataset, str]:
    size = manifest["size"]
    if size != img_size:
        raise DataError(
            f"{root} was prepared at {size}px but --img-size is {img_size}: train with --img-size {size}, "
            f"or run 'ddpmctl prepare SRC NEW_DST --size {img_size}'"
        )
    files = prepared_files(root, manifest)
    if not files:
        raise DataError(f"the prepared folder {root} holds no images: run 'ddpmctl prepare' on a folder with images")
    pack = manifest.get("pack") or {}
    pack_path = root / pack.get("file", PACK_FILE)
    if pack and pack_path.is_file():
        if pack.get("digest") == pack_digest(manifest) and pack.get("count") == len(files):
            dataset = PackedDataset(pack_path, img_size)
            if len(dataset) == len(files):
                return dataset, (f"{len(dataset)} images from {pack_path} ({img_size}px, packed, memory-mapped, "
                                 "read in the training process)")
        stale = f"; {pack_path.name} is out of date, rerun 'ddpmctl prepare --pack' to refresh it"
    else:
        stale = "; 'ddpmctl prepare --pack' would skip decoding altogether"
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{len(missing)} prepared image(s) are missing from {root} (e.g. {missing[0]}): "
                        "run 'ddpmctl prepare' again to restore them")
    return PreparedDataset(files, img_size), f"{len(files)} prepared {img_size}px images from {root}{stale}"


def data_root(path: str | Path | None) -> Path:
    """``--path-to-data`` as a path that exists, or a DataError saying what to pass."""
    if not path:
        raise DataError("no training data given: pass --path-to-data DIR (a folder of images)")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist: pass --path-to-data with a folder of images")
    return root


def build_dataset(path: str | Path | None, img_size: int, classes: str | tuple[str, ...] = "auto"
                  ) -> tuple[Dataset, str]:
    """The training dataset for ``path`` and a one-line description of how it is read.

    ``path`` may be a folder prepared by ``ddpmctl prepare`` (its manifest is checked against
    ``img_size``; a packed array is memory-mapped), a packed ``.npy`` file, or any folder of images
    (decoded and resized on the fly; the description then carries a hint to run ``prepare``).
    ``classes`` (labeled.with_labels): "auto", "none", or the class names a trained network needs; a
    dataset with classes has ``class_names`` and serves ``(image, label)`` items.
    """
    root = data_root(path)
    if root.is_file() and root.suffix.lower() == ".npy":
        dataset = PackedDataset(root, img_size)
        if len(dataset) == 0:
            raise DataError(f"{root} holds no images")
        return with_labels(dataset, None, classes), (f"{len(dataset)} images from {root} ({img_size}px, packed, "
                                                     "memory-mapped, read in the training process)")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass --path-to-data with a folder of images")
    manifest = read_manifest(root)
    if manifest is not None:
        dataset, desc = _prepared_dataset(root, manifest, img_size)
        return with_labels(dataset, sorted(manifest["images"]), classes, manifest.get("classes")), desc
    dataset = ImageFolderDataset(root, img_size)
    if len(dataset) == 0:
        raise DataError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
        )
    rels = [f.relative_to(root).as_posix() for f in dataset.files]
    return with_labels(dataset, rels, classes), (f"{len(dataset)} images from {root}, resized to {img_size}px on the fly (hint: "
                     f"'ddpmctl prepare {root} DST --size {img_size} --pack' checks them once and makes loading much faster)")


UPSCALE_SAMPLE = 500  # headers read to count small sources: a second or less, however large the folder
UPSCALE_SHARE = 0.1  # say so when at least this share of them is upscaled


def upscale_note(dataset: Dataset, img_size: int, sample: int = UPSCALE_SAMPLE) -> str | None:
    """One line when many images of a raw folder are smaller than ``img_size`` and will be upscaled on the fly.

    Only the headers are read (Pillow opens lazily), of every file or of ``sample`` files spread evenly over
    the folder; prepared and packed data were sized by ``ddpmctl prepare``, which reports upscaling itself.
    """
    if not isinstance(dataset, ImageFolderDataset) or not dataset.files:
        return None
    files = dataset.files
    if len(files) > sample:
        files = [files[i * (len(files) - 1) // (sample - 1)] for i in range(sample)]
    checked, small = 0, []
    for path in files:
        try:
            with open_image(path) as im:
                w, h = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # the loader says which files it cannot read, once each
        checked += 1
        if is_small(w, h, img_size, "center"):
            small.append(min(w, h))
    if not small or len(small) < UPSCALE_SHARE * checked:
        return None
    typical = max(set(small), key=small.count)
    of = (f"{len(small)} of the {checked} images" if checked == len(dataset.files)
          else f"{len(small)} of {checked} images checked (of {len(dataset.files)})")
    return (f"{of} in {dataset.root} are smaller than {img_size} px (most {typical} px on the shorter side) and are "
            f"upscaled on the fly, so samples may look soft: train at a smaller --img-size, or add larger images")


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


def _worker_ignores_ctrl_c(_worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the loader workers too; the main process handles it (finishes the step,
    saves). A worker killed by it would lose the batch in flight and crash the run: workers started by
    spawn (macOS) do not inherit the engine's handler, so they ignore SIGINT instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_message(exc: BaseException) -> str:
    """The message a DataLoader worker raised, without the "Caught ... Original Traceback" torch wraps it in."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(name)
    if at < 0:
        name = f"{type(exc).__qualname__}: "
        at = text.rfind(name)
    return text[at + len(name):].strip() if at >= 0 else text.strip().splitlines()[-1]


class BatchStream:
    """Endless iterator over batches that tracks (epoch, samples taken in the epoch) for exact resume."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, multiprocessing_context: str | None = None):
        self.sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        if getattr(dataset, "in_process", False):  # nothing to decode: worker processes would only add copies
            num_workers = 0
        self.batch_size = batch_size
        # A private generator keeps the loader from drawing worker seeds out of the global RNG.
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            collate_fn=getattr(dataset, "collate_fn", None),  # PackedDataset: its batch is already one tensor
            pin_memory=pin_memory, drop_last=False, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_worker_ignores_ctrl_c if num_workers > 0 else None,
            # None: the platform's start method, spawn on macOS (each worker imports ddpmctl and unpickles the
            # dataset, once per run: the workers persist across epochs). Tests pass "spawn" to check that on Linux.
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        self.epoch = 0
        self.position = 0  # samples of this rank's share of the epoch already returned
        self._it: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._it = None

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
            except DataError as exc:  # from a worker, torch adds its traceback to the message: keep the user's line
                raise type(exc)(worker_message(exc)) from None
            self.position += batch_images(batch).shape[0]
            return batch

    def __iter__(self) -> BatchStream:
        return self

    def close(self) -> None:
        self._it = None
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
