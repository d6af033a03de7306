"""A run's state across restarts: which checkpoint to resume from, and what saving and loading one carries.

:func:`resume_point` takes the run's lock and picks the checkpoint (rank 0, told to every rank);
:class:`RunState` holds what a checkpoint restores beyond the configuration (weights, EMA, optimizer, LR
schedule, loss scaler, step and skipped steps, each rank's RNG and data position) behind ``save`` and
``load``, the way torchtitan's components expose ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import __version__, checkpoints, rundir
from .config import Config, absolute_path, complete_saved, to_dict
from .data import BatchStream, data_root
from .errors import CheckpointError, ConfigError, DataError, DdpmctlError
from .files import check_writable
from .parts import Parts
from .runlock import RunInUseError, RunLock
from .runtime import DistInfo
from .state import rng_state, set_rng_state
from .step import load_optimizer_state

# ----------------------------------------------------------------------------- where to start


def resume_point(cfg: Config, dist_info: DistInfo, lock: RunLock) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start at step 0) and notes, the same on every rank.

    Rank 0 alone locks the run, tidies it and picks (and hashes) the checkpoint; the other ranks get its
    choice, or its error, so every rank loads the same step or fails the same way.
    """
    choice: dict[str, Any] = {}
    failure: Exception | None = None
    if dist_info.is_main:
        try:
            path, notes = _choose_checkpoint(cfg, lock)
            choice = {"path": str(path) if path is not None else None, "notes": notes}
        except Exception as exc:  # noqa: BLE001 - passed on to the other ranks, then re-raised
            failure = exc
            choice = {"error": type(exc).__name__, "user": isinstance(exc, DdpmctlError), "message": str(exc)}
    if dist_info.enabled and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0, group=dist_info.host_group)
        choice = box[0]
    if failure is not None:
        raise failure
    if "error" in choice:
        kinds = {"ConfigError": ConfigError, "CheckpointError": CheckpointError, "DataError": DataError,
                 "RunInUseError": RunInUseError}
        kind = kinds.get(choice["error"], DdpmctlError) if choice["user"] else RuntimeError
        raise kind(choice["message"])
    return (Path(choice["path"]) if choice["path"] else None), list(choice["notes"])


def _choose_checkpoint(cfg: Config, lock: RunLock) -> tuple[Path | None, list[str]]:
    """Rank 0: take the run's lock (one process per run), tidy, and resolve the checkpoint to load."""
    which, run_dir = cfg.training.resume_from_checkpoint, cfg.run_dir
    lock.acquire(create=True)
    if cfg.data.path_to_data:  # before the grids' folder is made for a run whose data is gone (moved?)
        data_root(cfg.data.path_to_data)
    check_writable(cfg.generated_dir, "--generated-directory")  # now, not at the first grid hours later
    rundir.clean_stale_temporaries(run_dir)  # may put back a checkpoint a kill left aside
    if not which:
        check_new_run(cfg)
        return None, []
    if which == "latest" and not rundir.list_checkpoints(run_dir):
        # Stopped (or killed) before its first save: nothing to lose, so resuming is starting over, as a
        # requeued job expects. Damaged checkpoint folders are another matter: resolve_checkpoint says why.
        return None, [f"{run_dir.name} has no checkpoint yet (it stopped before its first save): starting from step 0"]
    return rundir.resolve_checkpoint(run_dir, which)


def check_new_run(cfg: Config) -> None:
    """A new run may not start in a run folder that holds checkpoints (ConfigError saying how to continue it)."""
    existing = [c for c in rundir.list_checkpoints(cfg.run_dir) if c.complete]
    if existing:
        raise ConfigError(
            f"{cfg.run_dir} already holds {existing[-1].name}; continue it with 'ddpmctl resume "
            f"--experiment-name {cfg.run.experiment_name} --working-directory "
            f"{cfg.run.working_directory}' or pick a new --experiment-name"
        )


def data_position(meta: dict[str, Any], cfg: Config, num_images: int, world_size: int, rank: int = 0,
                  name: str = "the checkpoint") -> tuple[dict[str, int] | None, list[str]]:
    """Where a resumed run's data order goes on (``rank``'s BatchStream state; None: as a new run) and notes.

    It continues where it stopped, or at the next epoch when the number of images or of processes changed.
    """
    notes = []
    data_state = meta.get("data_state", {})
    saved_data, data_now = meta.get("config", {}).get("data", {}).get("path_to_data"), cfg.data.path_to_data
    images_then = data_state.get("num_images", num_images)  # absent in checkpoints of older versions
    recounted = images_then != num_images
    same_world = world_size == int(data_state.get("world_size", 1))
    # (older checkpoints hold the path as typed, relative to wherever training was started)
    if recounted or absolute_path(saved_data) != absolute_path(data_now):
        then = f"{saved_data} ({images_then} images)" if recounted else str(saved_data)
        notes.append(f"the data changed since {name}: {then} then, {data_now} ({num_images} images) "
                     "now; " + ("the data order restarts at the next epoch" if recounted
                                else "same number of images, so the data order goes on where it stopped"))
    if "ranks" not in data_state:
        return None, notes
    if same_world and not recounted:
        return data_state["ranks"][rank], notes
    # Another number of processes or of images: continue from the next epoch (no sample is replayed
    # twice within an epoch, but the partial epoch is cut short).
    if not same_world:
        notes.append(f"world size changed from {data_state.get('world_size')} to {world_size}: "
                     "data order restarts at the next epoch")
    return {"epoch": data_state["ranks"][0]["epoch"] + 1, "position": 0}, notes


def model_config_differs(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Model/diffusion options that differ between a checkpoint and the current config."""
    current = to_dict(cfg)
    diffs = []
    for section in ("model", "diffusion"):
        for key, value in saved.get(section, {}).items():
            if key in ("loss_fn", "loss_weighting", "min_snr_gamma"):  # the loss may change on resume, not the network
                continue
            if current[section].get(key) != value:
                diffs.append(f"{key} (checkpoint {value}, now {current[section].get(key)})")
    return diffs


# ----------------------------------------------------------------------------- the state


class RunState:
    """What a checkpoint carries beyond the configuration, for this rank; ``save`` gathers every rank's part."""

    def __init__(self, cfg: Config, parts: Parts, stream: BatchStream, dist_info: DistInfo, num_images: int):
        self.cfg, self.parts, self.stream, self.dist = cfg, parts, stream, dist_info
        self.num_images = num_images
        self.step = 0  # optimizer steps taken (skipped ones included)
        self.skipped = 0  # steps whose update was skipped (non-finite loss or gradient)

    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.enabled:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj, group=self.dist.host_group)  # gloo: CPU objects, no GPU pickling
        return out

    def save(self, loss: float | None, unreported_skips: int = 0) -> Path | None:
        """Every rank hands over its RNG and data position; rank 0 writes ``checkpoint_<step>`` (the caller waits).

        ``unreported_skips``: skipped steps the caller has not yet added to ``skipped`` (read at its next report).
        """
        rngs, data_states = self._gather(rng_state()), self._gather(self.stream.state_dict())
        p, path = self.parts, None
        if self.dist.is_main:
            scaler = p.step.scaler
            training_state = {
                "optimizer": p.optimizer.state_dict(),
                "scheduler": p.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng_per_rank": rngs,
                "ema_updates": p.ema.num_updates if p.ema else 0,
                "skipped_steps": self.skipped + unreported_skips,
            }
            meta = {
                "ddpmctl_version": __version__,
                "torch_version": torch.__version__,
                "config": to_dict(self.cfg),
                "data_state": {"world_size": self.dist.world_size, "num_images": self.num_images, "ranks": data_states},
                "loss": loss,
                "ema": p.ema is not None,
            }
            path = checkpoints.save_checkpoint(self.cfg.run_dir, self.step, p.model.state_dict(), training_state,
                                               meta, ema_state=p.ema.state_dict() if p.ema else None)
        return path

    def load(self, path: Path) -> list[str]:
        """Restore ``path`` into this state and its parts; returns notes for the user."""
        meta = checkpoints.read_meta(path)
        diffs = model_config_differs(complete_saved(meta.get("config", {})), self.cfg)
        if diffs:
            raise CheckpointError(
                f"{path.name} was trained with different model settings: {'; '.join(diffs)}. "
                "Resume with the run's own settings ('ddpmctl resume' reads them from config.yaml)"
            )
        try:
            notes = self._restore(path, meta)
        except torch.OutOfMemoryError:
            raise  # the machine's problem, not the file's
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # The files passed their checksums, so they are what was saved, but not what this ddpmctl saves
            # for this model (edited by hand, or from another tool): a user problem, not a bug.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(
                f"{path.name} does not fit this run ({type(exc).__name__}: {first}); resume from another "
                f"checkpoint with --resume-from-checkpoint checkpoint_N"
            ) from None
        return notes + self._apply_new_optimizer_settings(meta.get("config", {}).get("training", {}))

    def _restore(self, path: Path, meta: dict[str, Any]) -> list[str]:
        p, notes = self.parts, []
        p.model.load_state_dict(checkpoints.load_weights(path))
        state = checkpoints.load_training_state(path)
        if p.ema is not None:
            if (path / checkpoints.EMA).is_file():
                p.ema.model.load_state_dict(checkpoints.load_weights(path, checkpoints.EMA))
                p.ema.num_updates = int(state.get("ema_updates", 0))
            else:
                p.ema.model.load_state_dict(p.model.state_dict())
        load_optimizer_state(p.optimizer, state["optimizer"])
        # The schedule's lambda is rebuilt from this run's num_training_steps, so a resume may extend it.
        p.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            p.step.scaler.load_state_dict(state["scaler"])
        self.step = int(meta["step"])
        total = self.cfg.training.num_training_steps
        if self.step >= total:
            notes.append(f"{path.name} is at step {self.step} already (num_training_steps {total}): pass a larger "
                         "--num-training-steps to go on")
        self.skipped = int(state.get("skipped_steps", 0))
        notes += self._restore_data_position(path, meta)
        rng = state.get("rng_per_rank", [state.get("rng")])
        if rng and rng[0] is not None:
            rank = self.dist.rank
            set_rng_state(rng[rank] if rank < len(rng) else rng[0])
            if rank >= len(rng):  # more ranks than saved: the new ones draw their own noise
                torch.manual_seed(self.cfg.run.seed + 7919 * rank + self.step)
        return notes

    def _restore_data_position(self, path: Path, meta: dict[str, Any]) -> list[str]:
        """Continue the data order where it stopped, or at the next epoch when the images or ranks changed."""
        position, notes = data_position(meta, self.cfg, self.num_images, self.dist.world_size, self.dist.rank, path.name)
        if position is not None:
            self.stream.load_state_dict(position)
        return notes

    def _apply_new_optimizer_settings(self, saved: dict[str, Any]) -> list[str]:
        """Options given on resuming win over the optimizer state just loaded, which carries the old ones.

        The loaded state restores the peak learning rate (the schedule's base) and the weight decay of
        the checkpoint; left alone, ``resume --learning-rate`` would be recorded in config.yaml and ignored.
        """
        t, optimizer, scheduler = self.cfg.training, self.parts.optimizer, self.parts.scheduler
        old_lr, old_wd = scheduler.base_lrs[0], optimizer.param_groups[0]["weight_decay"]
        schedule_changed = (saved.get("warmup_steps", t.warmup_steps) != t.warmup_steps
                            or saved.get("num_training_steps", t.num_training_steps) != t.num_training_steps)
        if old_lr == t.learning_rate and old_wd == t.weight_decay and not schedule_changed:
            return []  # nothing changed: leave the loaded state bit for bit as saved
        scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = t.learning_rate
            group["weight_decay"] = t.weight_decay
            group["lr"] = t.learning_rate * lr_lambda(scheduler.last_epoch)  # the next step's rate, as step() would
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
        notes = []
        if old_lr != t.learning_rate:
            notes.append(f"learning rate {old_lr:g} -> {t.learning_rate:g} from here on (the schedule keeps its shape)")
        if old_wd != t.weight_decay:
            notes.append(f"weight decay {old_wd:g} -> {t.weight_decay:g} from here on")
        return notes
