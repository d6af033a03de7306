"""One checkpoint folder: its format, written atomically, checked on reading, loaded without running code.

Layout of ``RUN_DIR/checkpoint_<step>/``:
    model.safetensors        network weights (safetensors: no code can run on load)
    ema.safetensors          EMA weights, when EMA is on
    training_state.pt        optimizer, LR scheduler, grad scaler, RNG states: tensors and plain values
                             only, loaded with ``torch.load(weights_only=True)`` and never otherwise
    meta.json                step, resolved config, data-order state, versions, and the size and SHA-256
                             of every file above. Written last: it is the completion marker.

A checkpoint is first written to ``RUN_DIR/.tmp-checkpoint_<step>-<pid>/``, each file flushed and
fsynced, then renamed into place and the parent directory fsynced, so a checkpoint folder is either
whole or absent. What a run folder holds around its checkpoints (listing, rotation, resolving
``latest``) is in rundir.py.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import fsync_dir, fsync_file, sha256_file
from .layout import CHECKPOINT_PATTERN, checkpoint_name

FORMAT_VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "training_state.pt"
SCRATCH_PREFIXES = (".tmp-checkpoint_", ".old-checkpoint_", ".trash-checkpoint_")  # our own scratch folders


@dataclass
class CheckpointInfo:
    """What ``checkpoints list`` shows about one checkpoint folder."""

    path: Path
    step: int
    complete: bool  # meta.json present and every file it lists has the recorded size (and checksum, when verified)
    problem: str | None  # why it is not usable, when it is not
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size_bytes(self) -> int:
        try:
            return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        except OSError:  # removed meanwhile
            return 0

    @property
    def has_ema(self) -> bool:
        return (self.path / EMA).is_file()

    @property
    def saved_at(self) -> float | None:
        value = self.meta.get("saved_at")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def loss(self) -> float | None:
        """The training loss last reported before the save (None before the first report)."""
        value = self.meta.get("loss")
        return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------------- writing


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous, unshared CPU tensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    training_state: dict[str, Any],
    meta: dict[str, Any],
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint_<step>`` atomically into ``run_dir`` and return its path.

    A failure (disk full, Ctrl-C) leaves the run folder as it was: the temporary folder is removed and
    any older checkpoint of the same step is still in place (or restored by the next
    :func:`clean_stale_temporaries`).
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".tmp-checkpoint_{step}-{os.getpid()}"
    # Copied to the CPU before the try: a device error here is not a failed write and keeps its traceback.
    model_cpu = _contiguous(model_state)
    ema_cpu = _contiguous(ema_state) if ema_state is not None else None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(model_cpu, str(tmp / MODEL), metadata={"format": "pt"})
        if ema_cpu is not None:
            save_file(ema_cpu, str(tmp / EMA), metadata={"format": "pt"})
        torch.save(training_state, tmp / STATE)
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        full_meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            **meta,
            "files": files,
        }
        (tmp / META).write_text(json.dumps(full_meta, indent=1, sort_keys=False))
        fsync_file(tmp / META)
        fsync_dir(tmp)
        if final.exists():  # an older save of the same step (a rerun, or a damaged one): replace it only now
            old = run_dir / f".old-checkpoint_{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(run_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {final}: {exc.strerror or exc}; the previous checkpoints "
                              "are untouched") from None
    except (RuntimeError, SafetensorError) as exc:
        if isinstance(exc, RuntimeError) and not any(s in str(exc) for s in _WRITE_FAILURES):
            shutil.rmtree(tmp, ignore_errors=True)
            raise  # e.g. a CUDA error while copying state: a bug or a device problem, not the disk
        # torch.save reports a failed write (disk full, quota, I/O error) as RuntimeError("[enforce fail at
        # inline_container.cc:...] . unexpected pos ..."), safetensors as SafetensorError: the disk's answer,
        # not a bug. Free space is measured before the partial files go, while it is what the write ran into.
        free = _free_space(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {final}: {_first_line(exc)}; the disk may be full or over "
                              f"quota{free}; the previous checkpoints are untouched") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# What torch.save's RuntimeError says when the file could not be written (its zip writer reports a short write).
_WRITE_FAILURES = ("inline_container", "unexpected pos", "write", "space", "quota", "Input/output")


def _free_space(path: Path) -> str:
    """`` (12.0 MB free there)`` for an error message, or nothing when the disk cannot say."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024 or unit == "GB":
            break
        free /= 1024
    return f" ({free:.0f} {unit} free there)" if unit == "B" else f" ({free:.1f} {unit} free there)"


# ----------------------------------------------------------------------------- reading and listing


def inspect_checkpoint(path: str | Path, verify_hashes: bool = False) -> CheckpointInfo:
    """Read a checkpoint folder's meta.json and check its files are all there at the recorded sizes."""
    path = Path(path)
    match = CHECKPOINT_PATTERN.match(path.name)
    step = int(match.group(1)) if match else -1
    meta_path = path / META
    if not meta_path.is_file():
        return CheckpointInfo(path, step, False, "incomplete: no meta.json (the save did not finish)", {})
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        step = int(meta["step"])
        version = int(meta.get("format_version", 0))
        records = [(str(name), int(rec["size"]), str(rec["sha256"])) for name, rec in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return CheckpointInfo(path, step, False, "damaged: meta.json is unreadable", {})
    if version > FORMAT_VERSION:
        return CheckpointInfo(path, step, False, "written by a newer ddpmctl: upgrade ddpmctl to read it", meta)
    if MODEL not in files:
        return CheckpointInfo(path, step, False, "damaged: no model weights recorded", meta)
    for name, size, digest in records:
        f = path / Path(name).name  # a name in meta.json never points outside the folder
        if not f.is_file():
            return CheckpointInfo(path, step, False, f"damaged: {name} is missing", meta)
        if f.stat().st_size != size:
            return CheckpointInfo(path, step, False, f"damaged: {name} is truncated or changed", meta)
        if verify_hashes:
            try:
                matches = sha256_file(f) == digest
            except OSError as exc:  # a bad sector or a permission: the very damage the checksum is for
                return CheckpointInfo(path, step, False, f"damaged: {name} is unreadable ({exc.strerror or exc})", meta)
            if not matches:
                return CheckpointInfo(path, step, False, f"damaged: {name} does not match its checksum", meta)
    return CheckpointInfo(path, step, True, None, meta)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def load_weights(path: Path, name: str = MODEL) -> dict[str, torch.Tensor]:
    """Read a safetensors weight file, or raise CheckpointError."""
    try:
        return load_file(str(path / name))
    except Exception as exc:  # any failure to parse a file from disk is the file's fault, not a bug
        raise CheckpointError(f"cannot read {path / name}: {_first_line(exc)}") from None


def load_training_state(path: Path) -> dict[str, Any]:
    """Read training_state.pt with ``weights_only=True``; pickled objects are refused, never executed."""
    file = path / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only a refused GLOBAL (a class or function the file wants imported) is a pickled object that could
        # run code; any other unpickling failure (e.g. "Unsupported operand 189") means bytes that are no pickle.
        found = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", str(exc))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
            raise _not_a_state(file, f"unpickling failed: {detail.group(1).strip()}" if detail else "unpickling failed") from None
        raise CheckpointError(
            f"refusing to load {file}: it holds a pickled Python object ({found.group(1)}) that could run code; "
            "ddpmctl only loads tensors and plain values from checkpoints (use a checkpoint written by ddpmctl)"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # truncated zip, bad header, garbage the unpickler trips over: the file's fault, not a bug
        raise _not_a_state(file, _first_line(exc)) from None
    if not isinstance(state, dict) or "optimizer" not in state or "scheduler" not in state:
        raise CheckpointError(f"{file} is not a ddpmctl training state (no optimizer/scheduler state)")
    return state


def _not_a_state(file: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot read {file}: it is not a valid training state ({why[:200]}); the file is "
                           "damaged or was not written by ddpmctl")


def read_meta(path: Path) -> dict[str, Any]:
    info = inspect_checkpoint(path)
    if not info.complete:
        raise CheckpointError(f"{path} is {info.problem}")
    return info.meta


