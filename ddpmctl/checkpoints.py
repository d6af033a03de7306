"""Checkpoints that are safe to load, written atomically, and self-describing.

Layout of ``RUN_DIR/checkpoint_<step>/``:
    model.safetensors        network weights (safetensors: no code can run on load)
    ema.safetensors          EMA weights, when EMA is on
    training_state.pt        optimizer, LR scheduler, grad scaler, RNG states: tensors and plain values
                             only, loaded with ``torch.load(weights_only=True)`` and never otherwise
    meta.json                step, resolved config, data-order state, versions, and the size and SHA-256
                             of every file above. Written last: it is the completion marker.

A checkpoint is first written to ``RUN_DIR/.tmp-checkpoint_<step>-<pid>/``, each file flushed and
fsynced, then renamed into place and the parent directory fsynced. Rotation runs only after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT_VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "training_state.pt"
_NAME = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class CheckpointInfo:
    """What ``checkpoints list`` shows about one checkpoint folder."""

    path: Path
    step: int
    complete: bool  # meta.json present and every file it lists has the recorded size
    problem: str | None  # why it is not usable, when it is not
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    @property
    def has_ema(self) -> bool:
        return (self.path / EMA).is_file()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """Write ``checkpoint_<step>`` atomically into ``run_dir`` and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint_{step}"
    tmp = run_dir / f".tmp-checkpoint_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_contiguous(model_state), str(tmp / MODEL), metadata={"format": "pt"})
        if ema_state is not None:
            save_file(_contiguous(ema_state), str(tmp / EMA), metadata={"format": "pt"})
        torch.save(training_state, tmp / STATE)
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        full_meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            **meta,
            "files": files,
        }
        (tmp / META).write_text(json.dumps(full_meta, indent=1, sort_keys=False))
        _fsync_file(tmp / META)
        _fsync_dir(tmp)
        if final.exists():  # an older save of the same step (e.g. a rerun): replace it only now
            old = run_dir / f".old-checkpoint_{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def inspect_checkpoint(path: str | Path, verify_hashes: bool = False) -> CheckpointInfo:
    """Read a checkpoint folder's meta.json and check its files are all there at the recorded sizes."""
    path = Path(path)
    match = _NAME.match(path.name)
    step = int(match.group(1)) if match else -1
    meta_path = path / META
    if not meta_path.is_file():
        return CheckpointInfo(path, step, False, "incomplete: no meta.json (the save did not finish)", {})
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        step = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return CheckpointInfo(path, step, False, "damaged: meta.json is unreadable", {})
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        return CheckpointInfo(path, step, False, "written by a newer ddpmctl: upgrade ddpmctl to read it", meta)
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return CheckpointInfo(path, step, False, f"damaged: {name} is missing", meta)
        if f.stat().st_size != rec["size"]:
            return CheckpointInfo(path, step, False, f"damaged: {name} is truncated or changed", meta)
        if verify_hashes and _sha256(f) != rec["sha256"]:
            return CheckpointInfo(path, step, False, f"damaged: {name} does not match its checksum", meta)
    if MODEL not in files:
        return CheckpointInfo(path, step, False, "damaged: no model weights recorded", meta)
    return CheckpointInfo(path, step, True, None, meta)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """All ``checkpoint_<step>`` folders in ``run_dir`` (complete or not), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p) for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda c: c.step)


def clean_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove half-written ``.tmp-checkpoint_*`` folders left by a killed process."""
    run_dir = Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.is_dir() and (p.name.startswith(".tmp-checkpoint_") or p.name.startswith(".old-checkpoint_")):
                pid = p.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                    continue  # another live process is writing it
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rotate(run_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints so that ``keep`` remain; never ``protect`` or the newest."""
    complete = [c for c in list_checkpoints(run_dir) if c.complete]
    doomed = complete[: max(0, len(complete) - max(keep, 1))]
    removed = []
    for c in doomed:
        if protect is not None and c.path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    return removed


def resolve_checkpoint(run_dir: str | Path, which: str = "latest") -> tuple[Path, list[str]]:
    """Find the checkpoint to load: a name (checkpoint_N), a path, or 'latest' (newest usable one).

    Returns the path and notes to show the user (e.g. a damaged newest checkpoint that was passed over).
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    if which and which != "latest":
        candidate = Path(which)
        if not candidate.is_dir():
            candidate = run_dir / which
        if not candidate.is_dir():
            raise CheckpointError(f"checkpoint {which} not found in {run_dir}; {_existing(run_dir)}")
        info = inspect_checkpoint(candidate, verify_hashes=True)
        if not info.complete:
            raise CheckpointError(f"{candidate} is {info.problem}; {_existing(run_dir)}")
        return candidate, notes
    for info in reversed(list_checkpoints(run_dir)):
        checked = inspect_checkpoint(info.path, verify_hashes=True)
        if checked.complete:
            return checked.path, notes
        notes.append(f"skipped {info.name}: {checked.problem}")
    raise CheckpointError(f"no usable checkpoint in {run_dir}; {_existing(run_dir)}")


def _existing(run_dir: Path) -> str:
    found = list_checkpoints(run_dir)
    if not found:
        return "it holds no checkpoint" if run_dir.is_dir() else "that run folder does not exist"
    parts = [c.name if c.complete else f"{c.name} ({c.problem})" for c in found]
    return "it holds: " + ", ".join(parts)


def load_weights(path: Path, name: str = MODEL) -> dict[str, torch.Tensor]:
    """Read a safetensors weight file, or raise CheckpointError."""
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / name}: {exc}") from None


def load_training_state(path: Path) -> dict[str, Any]:
    """Read training_state.pt with ``weights_only=True``; pickled objects are refused, never executed."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refusing to load {path / STATE}: {reason[:200]}") from None


def read_meta(path: Path) -> dict[str, Any]:
    info = inspect_checkpoint(path)
    if not info.complete:
        raise CheckpointError(f"{path} is {info.problem}")
    return info.meta
