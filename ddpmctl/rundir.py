"""A run folder around its checkpoints: listing, resolving ``latest``, rotation, setting aside, tidying.

What a run folder holds is in layout.py; one checkpoint folder's format is in checkpoints.py. Deleting
renames a folder out of the way first, so a checkpoint folder is either whole or absent; a killed
process's scratch folders are tidied (or put back) by :func:`clean_stale_temporaries`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoints import META, SCRATCH_PREFIXES, CheckpointInfo, inspect_checkpoint
from .errors import CheckpointError
from .files import atomic_path, fsync_dir
from .layout import ABANDONED, CHECKPOINT_PATTERN, RUN_CONFIG, checkpoint_name
from .runlock import is_training


def list_checkpoints(run_dir: str | Path, verify_hashes: bool = False) -> list[CheckpointInfo]:
    """All ``checkpoint_<step>`` folders in ``run_dir`` (complete or not), oldest first.

    ``verify_hashes`` reads every file to check its SHA-256, as resume does: what a user is shown as good
    must be what resume would use. The training loop's rotation leaves it off (sizes only), so a save does
    not re-read every checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [inspect_checkpoint(p, verify_hashes) for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
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
        if not ((p.is_dir() or p.is_symlink()) and p.name.startswith(SCRATCH_PREFIXES)):
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
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _remove(path: Path) -> None:
    """rmtree, except that a symlink is unlinked: rmtree refuses links, and what one points to is not ours."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def discard(path: Path) -> None:
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
            discard(c.path)
        except OSError:
            continue  # removed by someone else meanwhile, or not ours to remove: not worth stopping training
        removed.append(c.path)
    return removed


def _named(run_dir: Path, which: str) -> Path:
    """``checkpoint_N``, ``N`` or a path: the run's own folder wins over one of the same name in the cwd."""
    name = checkpoint_name(int(which)) if which.isdigit() else which
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
            raise CheckpointError(f"checkpoint {which} not found in {run_dir}; {describe_contents(run_dir)}")
        info = inspect_checkpoint(candidate, verify_hashes=True)
        if not info.complete:
            raise CheckpointError(f"{candidate} is {info.problem}; {describe_contents(run_dir)}")
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
    raise CheckpointError(f"no usable checkpoint in {run_dir}; {describe_contents(run_dir, seen[::-1])}")


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
        fsync_dir(aside)
        fsync_dir(run_dir)
    except OSError as exc:
        raise CheckpointError(f"could not move {run_dir / newer[len(moved)].name} aside into {aside}: "
                              f"{exc.strerror or exc}") from None
    return [f"resuming from {Path(resumed).name}: the newer {', '.join(moved)} moved to {aside} "
            "(not deleted; 'latest' and rotation no longer see them)"]


def describe_contents(run_dir: Path, found: list[CheckpointInfo] | None = None) -> str:
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
        if parent.is_dir() and (CHECKPOINT_PATTERN.match(path.name) or list_checkpoints(parent)):
            raise CheckpointError(f"{path.name} not found in {parent}; {describe_contents(parent)}")
        runs = runs_in(parent) if parent.is_dir() else []
        if runs:
            raise CheckpointError(f"{path} does not exist; {parent} is a working directory holding "
                                  f"{runs_hint(parent, runs)}")
        raise CheckpointError(f"{path} does not exist: pass a checkpoint folder or a run folder")
    if (path / META).is_file() or CHECKPOINT_PATTERN.match(path.name):
        return resolve_checkpoint(path.parent, str(path))
    return resolve_checkpoint(path, "latest")



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
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
    return dropped
