"""Class labels for a training set: which classes its folders hold, and a dataset that serves them with the images.

A class-conditional batch is ``(images, labels)``: uint8 (B, 3, S, S) and int64 (B,); an unconditional one
stays a plain image tensor, so an unconditional run loads, draws and trains exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, default_collate

from .classes import class_folders, folder_labels
from .errors import DataError

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # images, or (images, labels) for a class-conditional run


def batch_images(batch: Batch | list[torch.Tensor]) -> torch.Tensor:
    """The images of a batch, with or without labels."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class LabeledDataset(Dataset):
    """A dataset whose items come with their class index: ``(image, label)`` items, ``(images, labels)`` batches."""

    def __init__(self, images: Dataset, labels: Sequence[int], class_names: tuple[str, ...]):
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.class_names = class_names
        self.in_process = getattr(images, "in_process", False)  # a packed array is read in the training process

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor] | list:
        """A packed array's whole batch in one gather (already collated: a tuple); else one item per index."""
        gather = getattr(self.images, "__getitems__", None)
        if gather is None:
            return [self[i] for i in indices]
        return self.images.collate_fn(gather(indices)), self.labels[indices]  # type: ignore[attr-defined]

    @staticmethod
    def collate_fn(items: tuple | list) -> tuple[torch.Tensor, torch.Tensor]:
        """Collate for DataLoader: a gathered batch is already ``(images, labels)``."""
        if isinstance(items, tuple):
            return items
        images, labels = default_collate(items)
        return images, labels


def with_labels(dataset: Dataset, rels: Sequence[str] | None, classes: str | tuple[str, ...],
                recorded: Sequence[str] | None = None) -> Dataset:
    """``dataset`` with class labels from its images' first-level folders, or as it is.

    ``rels``: each image's path relative to the data folder (None: a bare packed array, no folders).
    ``classes``: "auto" (the folders' classes, if any), "none", or the class names a trained network needs.
    ``recorded``: the classes ``ddpmctl prepare`` found and wrote in the manifest (None: an older manifest).
    """
    if classes == "none":
        return dataset
    if rels is None:
        found: tuple[str, ...] = ()
    else:
        found = tuple(recorded) if recorded is not None else class_folders(rels)
    if isinstance(classes, tuple) and found != classes:
        has = f"its classes are {', '.join(found)}" if found else "it has no class folders"
        raise DataError(f"this run's network was trained on the classes {', '.join(classes)}, but {has}: "
                        "train on data with the same class folders")
    if not found or rels is None:
        return dataset
    return LabeledDataset(dataset, folder_labels(rels, found), found)
