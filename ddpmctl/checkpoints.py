"""Checkpoints that are safe to load, written atomically, and self-describing.

Layout of ``RUN_DIR/checkpoint_<step>/``:
    model.safetensors        network weights (safetensors: no code can run on load)
    ema.safetensors          EMA weights, when EMA is on
    training_state.pt        optimizer, LR scheduler, grad scaler, RNG states: tensors and plain values
                             only, loaded with ``torch.load(weights_only=True)`` and never otherwise
    meta.json                step, resolved config, data-order state, versions, and the size and SHA-256
                             of every file above. Written last: it is the completion marker.

A checkpoint is first written to ``RUN_DIR/.tmp-checkpoint_<step>-<pid>/``, each file flushed and
fsynced, then renamed into place and the parent directory fsynced. Rotation runs only after that, and
deletes by renaming a folder out of the way first, so a checkpoint folder is either whole or absent.

``RUN_DIR/.lock`` is flock-ed by the one process training the run (see :class:`ddpmctl.runlock.RunLock`), and
``RUN_DIR/abandoned/`` keeps the checkpoints newer than the one a run was resumed from.
"""

from __future__ import annotations

import hashlib
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

FORMAT_VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
STATE = "training_state.pt"
_NAME = re.compile(r"^checkpoint_(\d+)$")
_SCRATCH = (".tmp-checkpoint_", ".old-checkpoint_", ".trash-checkpoint_")  # prefixes of our own scratch folders
LOCK = ".lock"  # RUN_DIR/.lock: flock-ed by the process training the run (rank 0), and by prune
ABANDONED = "abandoned"  # RUN_DIR/abandoned/: checkpoints newer than the one a run was resumed from
RUN_CONFIG = "config.yaml"  # RUN_DIR/config.yaml: what marks a folder as a run (WORKING_DIRECTORY/EXPERIMENT_NAME)


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
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
    """Write ``checkpoint_<step>`` atomically into ``run_dir`` and return its path.

    A failure (disk full, Ctrl-C) leaves the run folder as it was: the temporary folder is removed and
    any older checkpoint of the same step is still in place (or restored by the next
    :func:`clean_stale_temporaries`).
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint_{step}"
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
            _fsync_file(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
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
        if final.exists():  # an older save of the same step (a rerun, or a damaged one): replace it only now
            old = run_dir / f".old-checkpoint_{step}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(run_dir)
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
            return f" ({free:.0f} {unit} free there)" if unit == "B" else f" ({free:.1f} {unit} free there)"
        free /= 1024
    return ""


# ----------------------------------------------------------------------------- reading and listing


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


def list_checkpoints(run_dir: str | Path, verify_hashes: bool = False) -> list[CheckpointInfo]:
    """All ``checkpoint_<step>`` folders in ``run_dir`` (complete or not), oldest first.

    ``verify_hashes`` reads every file to check its SHA-256, as resume does: what a user is shown as good
    must be what resume would use. The training loop's rotation leaves it off (sizes only), so a save does
    not re-read every checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p, verify_hashes) for p in run_dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda c: (c.step, c.name))


def newest_good(run_dir: str | Path) -> CheckpointInfo | None:
    """The newest checkpoint whose files match their checksums (what 'latest' resumes from), or None.

    Only folders complete by size are hashed, newest first, up to the first good one.
    """
    for info in reversed(list_checkpoints(run_dir)):
        if info.complete:
            checked = inspect_checkpoint(info.path, verify_hashes=True)
            if checked.complete:
                return checked
    return None


def runs_in(folder: str | Path) -> list[str]:
    """The run folders (those holding a config.yaml) directly inside ``folder``, as in a working directory."""
    folder = Path(folder)
    try:
        return sorted(p.parent.name for p in folder.glob(f"*/{RUN_CONFIG}") if p.is_file())
    except OSError:
        return []


def runs_hint(folder: Path, runs: list[str]) -> str:
    """``the runs a, b (pass one of them, e.g. FOLDER/a)`` for messages about a working directory."""
    shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
    return f"the runs {shown} (pass one of them, e.g. {folder / runs[0]})"


def _scratch_owner(name: str) -> int | None:
    pid = name.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def clean_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Tidy the scratch folders a killed process left behind.

    ``.tmp-*`` (a save that did not finish) and ``.trash-*`` (a deletion that did not finish) are
    removed. ``.old-checkpoint_N-*`` is the previous copy of a checkpoint that was being replaced: if
    ``checkpoint_N`` is missing it is put back, otherwise removed.
    """
    run_dir = Path(run_dir)
    touched = []
    if not run_dir.is_dir():
        return touched
    for p in sorted(run_dir.iterdir()):
        if not ((p.is_dir() or p.is_symlink()) and p.name.startswith(_SCRATCH)):
            continue
        pid = _scratch_owner(p.name)
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            continue  # another live process is working on it
        if p.name.startswith(".old-checkpoint_"):
            final = run_dir / p.name[len(".old-"):].rsplit("-", 1)[0]
            if not final.exists() and inspect_checkpoint(p).complete:
                p.rename(final)
                touched.append(final)
                continue
        _remove(p)  # a .trash-* symlink (an older prune's leftover) loses the link only
        touched.append(p)
    return touched


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """rmtree, except that a symlink is unlinked: rmtree refuses links, and what one points to is not ours."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder so that it vanishes at once: rename it aside, then remove the files.

    A symlinked checkpoint loses only the link (removing a link is atomic already); the folder it points to,
    perhaps another run's, is left alone.
    """
    if path.is_symlink():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    if trash.exists() or trash.is_symlink():
        _remove(trash)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def rotate(run_dir: str | Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints so that ``keep`` remain; never ``protect`` or the newest."""
    complete = [c for c in list_checkpoints(run_dir) if c.complete]
    doomed = complete[: max(0, len(complete) - max(keep, 1))]
    removed = []
    for c in doomed:
        if protect is not None and c.path.resolve() == Path(protect).resolve():
            continue
        try:
            _discard(c.path)
        except OSError:
            continue  # removed by someone else meanwhile, or not ours to remove: not worth stopping training
        removed.append(c.path)
    return removed


def _named(run_dir: Path, which: str) -> Path:
    """``checkpoint_N``, ``N`` or a path: the run's own folder wins over one of the same name in the cwd."""
    name = f"checkpoint_{which}" if which.isdigit() else which
    inside = run_dir / name
    if inside.is_dir():
        return inside
    return Path(which).expanduser()


def resolve_checkpoint(run_dir: str | Path, which: str = "latest") -> tuple[Path, list[str]]:
    """Find the checkpoint to load: a name (checkpoint_N), a path, or 'latest' (newest usable one).

    Returns the path and notes to show the user (e.g. a damaged newest checkpoint that was passed over).
    """
    run_dir = Path(run_dir)
    notes: list[str] = []
    if which and which != "latest":
        candidate = _named(run_dir, which)
        if not candidate.is_dir():
            raise CheckpointError(f"checkpoint {which} not found in {run_dir}; {_existing(run_dir)}")
        info = inspect_checkpoint(candidate, verify_hashes=True)
        if not info.complete:
            raise CheckpointError(f"{candidate} is {info.problem}; {_existing(run_dir)}")
        return candidate, notes
    skipped, seen = [], []
    for info in reversed(list_checkpoints(run_dir)):
        checked = inspect_checkpoint(info.path, verify_hashes=True) if info.complete else info
        if checked.complete:
            if skipped:
                notes.append(f"{', '.join(skipped)}; using {checked.name}, the newest good checkpoint")
            return checked.path, notes
        skipped.append(f"{info.name} is {checked.problem}")
        seen.append(checked)
    raise CheckpointError(f"no usable checkpoint in {run_dir}; {_existing(run_dir, seen[::-1])}")


def set_aside_newer(run_dir: str | Path, resumed: Path) -> list[str]:
    """Move the complete checkpoints of ``run_dir`` newer than ``resumed`` into ``RUN_DIR/abandoned/`` (none deleted).

    Resuming from an older checkpoint starts a new branch: left in place, the abandoned branch's newer
    checkpoints would be what 'latest' and rotation pick. Returns notes saying what went where.
    """
    run_dir = Path(run_dir)
    step = inspect_checkpoint(resumed).step
    # Damaged newer folders stay: 'latest' passes over them and the new branch replaces them at their step.
    newer = [c for c in list_checkpoints(run_dir)
             if c.complete and c.step > step and c.path.resolve() != Path(resumed).resolve()]
    if not newer:
        return []
    aside = run_dir / ABANDONED
    moved = []
    try:
        aside.mkdir(exist_ok=True)
        for c in newer:
            target, n = aside / c.name, 2
            while target.exists():  # abandoned twice at the same step: keep both
                target, n = aside / f"{c.name}-{n}", n + 1
            c.path.rename(target)
            moved.append(c.name)
        _fsync_dir(aside)
        _fsync_dir(run_dir)
    except OSError as exc:
        raise CheckpointError(f"could not move {run_dir / newer[len(moved)].name} aside into {aside}: "
                              f"{exc.strerror or exc}") from None
    return [f"resuming from {Path(resumed).name}: the newer {', '.join(moved)} moved to {aside} "
            "(not deleted; 'latest' and rotation no longer see them)"]


def _existing(run_dir: Path, found: list[CheckpointInfo] | None = None) -> str:
    """What ``run_dir`` holds, each unusable checkpoint with the reason, for an error message.

    ``found``: the run's checkpoints already inspected with their checksums, where the caller has them;
    else sizes only (an error message is no reason to read every checkpoint of a run).
    """
    if found is None:
        found = list_checkpoints(run_dir)
    if not found:
        if run_dir.is_file():
            return "that is a file, not a run folder"
        if not run_dir.is_dir():
            return "that run folder does not exist"
        runs = runs_in(run_dir)
        if runs:
            return f"it is a working directory holding {runs_hint(run_dir, runs)}"
        from .runlock import is_training  # runlock imports this module

        training = is_training(run_dir)
        if training is None:  # no locks here (Windows), or the lock cannot be read: say what is certain
            return "it holds no checkpoint yet"
        if training:
            return "it holds no checkpoint yet (the run is still training toward its first save)"
        return "it holds no checkpoint yet (the run stopped before its first save)"
    parts = [c.name if c.complete else f"{c.name} ({c.problem})" for c in found]
    return "it holds: " + ", ".join(parts)


def locate(path: str | Path) -> tuple[Path, list[str]]:
    """PATH is a checkpoint folder, or a run folder whose newest usable checkpoint is used."""
    path = Path(path).expanduser()
    if path.is_file():  # e.g. RUN/metrics.jsonl or a checkpoint's model.safetensors: point at its folder
        parent = path.parent
        if (parent / META).is_file():
            hint = f"pass the checkpoint folder {parent}"
        elif list_checkpoints(parent) or (parent / RUN_CONFIG).is_file():
            hint = f"pass the run folder {parent}"
        else:
            hint = "pass a checkpoint folder or a run folder"
        raise CheckpointError(f"{path} is a file, not a checkpoint folder or a run folder: {hint}")
    if not path.exists():
        parent = path.parent
        if parent.is_dir() and (_NAME.match(path.name) or list_checkpoints(parent)):
            raise CheckpointError(f"{path.name} not found in {parent}; {_existing(parent)}")
        runs = runs_in(parent) if parent.is_dir() else []
        if runs:
            raise CheckpointError(f"{path} does not exist; {parent} is a working directory holding "
                                  f"{runs_hint(parent, runs)}")
        raise CheckpointError(f"{path} does not exist: pass a checkpoint folder or a run folder")
    if (path / META).is_file() or _NAME.match(path.name):
        return resolve_checkpoint(path.parent, str(path))
    return resolve_checkpoint(path, "latest")


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


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop metrics.jsonl rows logged after ``step`` (and torn lines) before a resume; returns rows dropped.

    A killed run may have logged steps past its last checkpoint; resuming replays them, so without
    this they would appear twice.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ok = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped
