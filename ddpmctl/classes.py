"""Class folders as labels, and the training settings a run takes from its data (no torch: prepare uses it).

A folder whose images all sit in two or more subfolders (``cats/``, ``dogs/``) is a class-conditional
dataset: class i is the i-th subfolder name in sorted order, as in torchvision's ImageFolder. The names
travel in the model config (``class_names``), so every checkpoint and exported file maps NAME -> INDEX.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import Config, apply_overrides
from .errors import ConfigError
from .images import find_images
from .prepared import IMAGES_DIR

# Below this many training images a run counts as small: dropout on by default, --augment recommended.
SMALL_DATASET = 10_000
# Ho et al. 2020 (App. B) swept dropout on CIFAR-10 (50,000 images) and kept 0.1: without it the samples showed
# "overfitting artifacts"; their larger sets (LSUN) and ImageNet (Nichol & Dhariwal 2021) trained without it.
# A set under a fifth of CIFAR-10's size overfits sooner still, so it gets CIFAR-10's rate; larger sets keep
# 0 unless told otherwise (configs/cifar10_ddpm.yaml sets 0.1).
SMALL_DATASET_DROPOUT = 0.1
RECOMMENDED_AUGMENT = 0.12  # the augmentation probability of EDM's train.py (its CIFAR-10 setting)


def class_folders(rels: Sequence[str]) -> tuple[str, ...]:
    """Class names from image paths relative to their root (posix): the first-level folders, sorted, when
    every image sits in one and there are at least two; () otherwise (loose images, or a single folder)."""
    tops = set()
    for rel in rels:
        head, sep, _ = rel.partition("/")
        if not sep:
            return ()
        tops.add(head)
    return tuple(sorted(tops)) if len(tops) >= 2 else ()


def folder_labels(rels: Sequence[str], names: Sequence[str]) -> list[int]:
    """The class index of each path: the position of its first-level folder in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    return [index[rel.partition("/")[0]] for rel in rels]


def describe_classes(names: Sequence[str], labels: Sequence[int]) -> str:
    """``2 classes: discs (32), squares (30)``."""
    counts = [0] * len(names)
    for label in labels:
        counts[label] += 1
    return f"{len(names)} classes: " + ", ".join(f"{n} ({c:,})" for n, c in zip(names, counts, strict=True))


def class_index(names: Sequence[str], spec: str | int) -> int:
    """The index of class ``spec`` (a name, or an index), or a ConfigError listing the model's classes."""
    if not names:
        raise ConfigError("--class needs a class-conditional model; this one was trained without classes")
    text = str(spec)
    if text in names:
        return list(names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
        return int(text)
    shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:20])) + (", ..." if len(names) > 20 else "")
    raise ConfigError(f"unknown class {text!r}: this model's classes are {shown} (pass a name or an index)")


def saved_network(cfg: Config, saved: dict) -> Config:
    """``cfg`` with the settings its network took from its data when first trained (``saved``: a checkpoint's
    config): they are no options, so a resumed run gets them from its checkpoint, whatever ``cfg`` says."""
    model = saved.get("model", {})
    over = {k: model[k] for k in ("class_names", "augment_dim") if k in model}
    if cfg.model.dropout is None and model.get("dropout") is not None:
        over["dropout"] = model["dropout"]
    return apply_overrides(cfg, over) if over else cfg


def fit_to_data(cfg: Config, class_names: tuple[str, ...], labels: Sequence[int], num_images: int, fresh: bool,
                augment_dim: int) -> tuple[Config, list[str]]:
    """``cfg`` with what a run takes from its data, and the lines that say so.

    ``fresh``: a new network (neither resumed nor fine-tuned), which takes the data's classes and an
    augmentation input of ``augment_dim`` numbers when --augment is on; an existing network keeps its own.
    Dropout left unset is chosen by the dataset's size (SMALL_DATASET).
    """
    m, notes, over = cfg.model, [], {}
    if fresh:
        over = {"class_names": class_names, "augment_dim": augment_dim if cfg.data.augment > 0 else 0}
    elif cfg.data.augment > 0 and not m.augment_dim:
        raise ConfigError("--augment needs a network with augmentation inputs, and this one was built without them "
                          "(it trained without --augment): start a new run to use it, or pass --augment 0")
    small = num_images < SMALL_DATASET
    if m.dropout is None:
        over["dropout"] = SMALL_DATASET_DROPOUT if small else 0.0
        size = f"{num_images:,} images, {'under' if small else 'at least'} {SMALL_DATASET:,}"
        line = f"dropout {over['dropout']:g} ({size}; --dropout to change)"
        if fresh and small and cfg.data.augment == 0:
            line += (f"; --augment {RECOMMENDED_AUGMENT} is recommended for a set this small (non-leaking "
                     "augmentation, Karras et al. 2022)")
        notes.append(line)
    if class_names:
        notes.append(f"{describe_classes(class_names, labels)} (one per folder; --classes none trains without them)")
        width = m.starting_channels * m.channel_multipliers[0]
        if fresh and m.norm_groups is None and 32 % width == 0:
            # One channel per GroupNorm group subtracts each channel's mean, and with it the time and class
            # embedding every residual block adds as a per-channel offset (docs/classes.md).
            notes.append(f"the {width}-channel layers normalise each channel alone, which cancels the class "
                         f"embedding there: --norm-groups {max(1, m.starting_channels // 4)} keeps several in each group")
    return (apply_overrides(cfg, over) if over else cfg), notes


def folder_counts(root: Path, names: Sequence[str]) -> list[int]:
    """Images in each class folder of ``root`` (or of ``root/images``, a prepared folder); zeros where absent."""
    base = root / IMAGES_DIR if not any((root / n).is_dir() for n in names) else root
    return [len(find_images(base / n)) if (base / n).is_dir() else 0 for n in names]


def proportional_labels(counts: Sequence[int], num: int) -> list[int] | None:
    """``num`` class indices in proportion to ``counts`` (largest remainders), class by class; None if all are 0."""
    total = sum(counts)
    if not total:
        return None
    quotas = [num * c / total for c in counts]
    share = [int(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda i: share[i] - quotas[i])
    for i in by_remainder[: num - sum(share)]:
        share[i] += 1
    return [i for i, k in enumerate(share) for _ in range(k)]
