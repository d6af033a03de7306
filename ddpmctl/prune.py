"""Thinning out and exporting a run's checkpoints: what ``ddpmctl checkpoints prune|export`` do.

:func:`plan_prune` decides which checkpoint folders to keep and which to remove (with the reason for
each), and :func:`execute_prune` deletes them under the run's lock, always sparing the newest good
checkpoint (one whose files match their checksums: what resume would load). :func:`export_weights`
writes a checkpoint's EMA (else raw) weights as one safetensors file that carries the model config in its
metadata, loadable without ddpmctl's checkpoint code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from .checkpoints import (
    _NAME,
    EMA,
    META,
    MODEL,
    CheckpointInfo,
    _discard,
    _fsync_dir,
    _fsync_file,
    inspect_checkpoint,
    list_checkpoints,
    load_weights,
    locate,
    newest_good,
    read_meta,
    runs_hint,
    runs_in,
)
from .config import complete_saved
from .errors import CheckpointError
from .runlock import RunLock

# ----------------------------------------------------------------------------- prune


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
    if _NAME.match(run_dir.name) and (run_dir / META).is_file():
        raise CheckpointError(f"{run_dir} is a checkpoint folder; pass its run folder {run_dir.parent}")
    runs = runs_in(run_dir)
    if runs and not any(_NAME.match(p.name) and p.is_dir() for p in run_dir.iterdir()):
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
            _discard(info.path)
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as exc:
            done = f" ({len(removed)} deleted before it)" if removed else ""
            raise CheckpointError(f"could not delete {info.path}: {exc.strerror or exc}{done}") from None
        removed.append(info.path)
    _fsync_dir(plan.run_dir)
    return removed


# ----------------------------------------------------------------------------- export


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata=metadata)
        _fsync_file(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from None
    return ExportResult(ckpt, out, metadata["weights"], int(meta["step"]), len(weights), out.stat().st_size, notes)
