"""Thinning out a run's checkpoints: what ``ddpmctl checkpoints prune`` does.

:func:`plan_prune` decides which checkpoint folders to keep and which to remove (with the reason for
each), and :func:`execute_prune` deletes them under the run's lock, always sparing the newest good
checkpoint (one whose files match their checksums: what resume would load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import META, CheckpointInfo, inspect_checkpoint
from .errors import CheckpointError
from .files import fsync_dir
from .layout import CHECKPOINT_PATTERN
from .rundir import discard, list_checkpoints, newest_good, runs_hint, runs_in
from .runlock import RunLock


@dataclass
class PrunePlan:
    """What ``checkpoints prune`` would do: every checkpoint folder, kept or removed, with the reason."""

    run_dir: Path
    keep: list[tuple[CheckpointInfo, str]] = field(default_factory=list)
    remove: list[tuple[CheckpointInfo, str]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(info.size_bytes for info, _ in self.remove if not info.path.is_symlink())  # a link frees nothing


def check_run_dir(run_dir: Path) -> None:
    """A run folder must exist, and a checkpoint folder given by mistake is pointed at its run folder."""
    if run_dir.is_file():
        raise CheckpointError(f"{run_dir} is a file, not a run folder; pass its folder {run_dir.parent} if that is the run")
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if CHECKPOINT_PATTERN.match(run_dir.name) and (run_dir / META).is_file():
        raise CheckpointError(f"{run_dir} is a checkpoint folder; pass its run folder {run_dir.parent}")
    runs = runs_in(run_dir)
    if runs and not any(CHECKPOINT_PATTERN.match(p.name) and p.is_dir() for p in run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} holds no checkpoint: it is a working directory holding {runs_hint(run_dir, runs)}")


def plan_prune(run_dir: str | Path, keep: int, keep_every: int | None = None) -> PrunePlan:
    """Keep the newest ``keep`` complete checkpoints (and every ``keep_every``-th step); remove the rest.

    Damaged or incomplete folders are removed too, except the newest folder of all, which is never
    touched; the newest good checkpoint is always kept. What is kept as good is checked against its
    checksums, as resume checks it: by sizes alone a newest checkpoint with a flipped byte would be kept and
    every good one deleted. Folders removed anyway are not hashed, so a run of many big checkpoints is not
    read whole.
    """
    run_dir = Path(run_dir)
    if keep < 1:
        raise CheckpointError("--keep must be at least 1: the newest checkpoint is never deleted")
    if keep_every is not None and keep_every < 1:
        raise CheckpointError("--keep-every must be at least 1")
    check_run_dir(run_dir)
    found = list_checkpoints(run_dir)
    keep_rows: list[tuple[CheckpointInfo, str]] = []
    remove_rows: list[tuple[CheckpointInfo, str]] = []
    good = 0  # good checkpoints kept so far, newest first
    for pos, info in enumerate(reversed(found)):
        milestone = bool(keep_every) and info.step % keep_every == 0
        if info.complete and (good < keep or milestone):
            info = inspect_checkpoint(info.path, verify_hashes=True)
        if pos == 0:
            good += int(info.complete)
            keep_rows.append((info, "newest" if info.complete else f"newest folder, {info.problem}"))
        elif not info.complete:
            remove_rows.append((info, info.problem or "unusable"))
        elif good < keep:
            good += 1
            keep_rows.append((info, "newest complete" if good == 1 else f"among the newest {keep}"))
        elif milestone:
            keep_rows.append((info, f"milestone (every {keep_every})"))
        else:
            remove_rows.append((info, f"not among the newest {keep}"))
    return PrunePlan(run_dir, keep_rows[::-1], remove_rows[::-1])


def execute_prune(plan: PrunePlan) -> list[Path]:
    """Delete what ``plan`` marks for removal; the newest good checkpoint is re-checked (checksums) and spared.

    Refused (RunInUseError) while a training process holds the run's lock.
    """
    with RunLock(plan.run_dir):
        return _execute_prune(plan)


def _execute_prune(plan: PrunePlan) -> list[Path]:
    # Re-checked now, with checksums: the plan may be stale, and what is spared must be what resume would load.
    newest = newest_good(plan.run_dir)
    spared = {newest.path.resolve()} if newest is not None else set()
    removed = []
    for info, _reason in plan.remove:
        if info.path.resolve() in spared or not info.path.is_dir():
            continue
        try:
            discard(info.path)
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as exc:
            done = f" ({len(removed)} deleted before it)" if removed else ""
            raise CheckpointError(f"could not delete {info.path}: {exc.strerror or exc}{done}") from None
        removed.append(info.path)
    fsync_dir(plan.run_dir)
    return removed
