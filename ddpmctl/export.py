"""Handing a model on: a checkpoint's weights as one safetensors file with its config in the metadata.

What ``ddpmctl checkpoints export`` writes: a checkpoint's EMA (else raw) weights, loadable without
ddpmctl's checkpoint code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from .checkpoints import EMA, META, MODEL, load_weights, read_meta
from .config import complete_saved
from .errors import CheckpointError
from .files import atomic_path
from .rundir import locate


@dataclass
class ExportResult:
    source: Path
    out: Path
    weights: str  # "ema" or "model"
    step: int
    tensors: int
    size_bytes: int
    notes: list[str]


def export_weights(path: str | Path, out: str | Path, overwrite: bool = False) -> ExportResult:
    """Write a checkpoint's EMA (else raw) weights as one safetensors file, model config in its metadata.

    Read it back without ddpmctl's checkpoint code::

        from safetensors import safe_open
        from safetensors.torch import load_file
        from ddpmctl.model import UNet
        from ddpmctl.config import saved_model_config
        meta = safe_open(FILE, "pt").metadata()
        model = UNet(saved_model_config(json.loads(meta["model_config"])))  # fills options the file predates
        model.load_state_dict(load_file(FILE))
    """
    ckpt, notes = locate(path)
    out = Path(out).expanduser()
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder: pass a file name such as {out / 'model.safetensors'}")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists: pass --force to overwrite it")
    meta = read_meta(ckpt)
    config = complete_saved(meta.get("config", {}))
    if "model" not in config:
        raise CheckpointError(f"{ckpt / META} holds no model config")
    which = EMA if (ckpt / EMA).is_file() else MODEL
    if which == MODEL:
        notes.append(f"{ckpt.name} has no EMA weights; exported the raw weights")
    weights = load_weights(ckpt, which)
    metadata = {
        "format": "pt",
        "model_config": json.dumps(config["model"]),
        "diffusion_config": json.dumps(config.get("diffusion", {})),
        "weights": "ema" if which == EMA else "model",
        "step": str(meta.get("step")),
        "ddpmctl_version": str(meta.get("ddpmctl_version", "")),
        "source": str(ckpt),
    }
    try:
        with atomic_path(out, fsync=True) as tmp:
            save_file(weights, str(tmp), metadata=metadata)
    except OSError as exc:
        raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from None
    return ExportResult(ckpt, out, metadata["weights"], int(meta["step"]), len(weights), out.stat().st_size, notes)
