"""The training loop. It never prints: progress goes out as events to a callback the CLI renders.

One call, :func:`train`, runs a whole run (fresh or resumed) on one process or under torchrun:
data -> forward process -> network -> loss -> AdamW (cosine schedule with warmup), with EMA, gradient
accumulation and clipping, a non-finite-step guard, periodic checkpoints and progression grids, and a
clean stop on Ctrl-C / SIGTERM that saves a checkpoint first.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from . import __version__, checkpoints, plots, runlock
from .config import (
    Config,
    absolute_path,
    check_attention_resolutions,
    complete_saved,
    dump_yaml,
    to_dict,
    with_absolute_paths,
)
from .data import BatchStream, build_dataset, data_root
from .diffusion import Schedule
from .errors import CheckpointError, ConfigError, DataError, DdpmctlError, TrainingStopped
from .events import (
    CheckpointSaved,
    Evaluating,
    Event,
    GridSaved,
    Note,
    StepStats,
    TrainFinished,
    TrainStarted,
)
from .interrupts import StopFlag, interrupt_handlers
from .machine import cpu_cores
from .model import set_low_precision_norms
from .runtime import (
    DistInfo,
    Precision,
    barrier,
    build_model,
    configure_backends,
    init_distributed,
    low_precision_norms,
    resolve_precision,
    select_device,
)
from .sampling import progression_grid, sample, save_png
from .state import EMA, rng_state, set_rng_state
from .step import GradSync, TrainStep, graph_blocker, load_optimizer_state, make_optimizer

# ----------------------------------------------------------------------------- helpers


def evaluation_noise(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
    """Fixed x_T and sampler generator, so grids from different steps are comparable."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.run.seed + 1_000_003)
    size = cfg.model.img_size
    noise = torch.randn((cfg.sampling.num_generations, 3, size, size), generator=gen)
    step_gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 2_000_003)
    return noise.to(device), step_gen


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_writable(folder: Path, option: str) -> None:
    """Create ``folder`` and write a scratch file in it, or raise ConfigError naming ``option``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ddpmctl-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder}: {exc.strerror or exc}; pass a {option} you can write to") from None


def model_config_differs(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Model/diffusion options that differ between a checkpoint and the current config."""
    current = to_dict(cfg)
    diffs = []
    for section in ("model", "diffusion"):
        for key, value in saved.get(section, {}).items():
            if key in ("loss_fn",):
                continue
            if current[section].get(key) != value:
                diffs.append(f"{key} (checkpoint {value}, now {current[section].get(key)})")
    return diffs


def _wandb_module(cfg: Config) -> Any:
    if not cfg.logging.use_wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--use-wandb needs Weights & Biases: pip install 'ddpmctl[wandb]'") from None
    return wandb


# ----------------------------------------------------------------------------- the loop


def wants_deferred_guard(device: torch.device, precision: Precision) -> bool:
    """Keep the non-finite check on the device (CUDA, bf16/fp32): the CPU and MPS check on the host each step."""
    return device.type == "cuda" and not precision.use_scaler


@dataclass
class TrainResult:
    step: int
    checkpoint: str | None
    run_dir: str


def train(cfg: Config, on_event: Callable[[Event], None] | None = None, stop: StopFlag | None = None) -> TrainResult:
    """Train (or resume, when ``cfg.training.resume_from_checkpoint`` is set) and return where it ended."""
    emit = on_event or (lambda _e: None)
    stop = stop or StopFlag()
    cfg = with_absolute_paths(cfg)  # config.yaml must mean the same from any directory
    if not cfg.training.resume_from_checkpoint:  # a run saved before the check keeps its (attention-less) setting
        check_attention_resolutions(cfg.model)
    dist_info = init_distributed(cfg.run.device)
    created = missing_folders(cfg.run_dir, cfg.generated_dir) if dist_info.is_main else []
    try:
        with interrupt_handlers(stop):
            trainer = _Trainer(cfg, dist_info, emit, stop)
            try:
                return trainer.run()
            finally:
                # A start that failed (bad data, Ctrl-C) leaves no empty folders behind, tidied only by the
                # process that held the run's lock (never a run another process has just begun).
                tidy = trainer.lock.held and not trainer.started
                if tidy and cfg.run_dir in created:
                    (cfg.run_dir / "config.yaml").unlink(missing_ok=True)
                trainer.lock.release()  # taken by rank 0 in _resume_point; removes the lock file
                if tidy:
                    remove_empty_folders(created)
    finally:
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def missing_folders(*paths: Path) -> list[Path]:
    """The folders that creating ``paths`` would make, deepest first (each path's missing ancestors too)."""
    out: list[Path] = []
    for path in paths:
        chain: list[Path] = []
        while not path.exists() and path.parent != path:
            chain.append(path)
            path = path.parent
        out += [p for p in chain if p not in out]
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty; one that is not (any more) stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


class _Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo, emit: Callable[[Event], None], stop: StopFlag):
        self.cfg, self.dist, self.stop = cfg, dist_info, stop
        self.started = False  # set once training begins: a failure before that tidies away the folders it made
        self.emit = emit if dist_info.is_main else (lambda _e: None)  # other ranks stay quiet
        self.run_dir = cfg.run_dir
        self.lock = runlock.RunLock(self.run_dir)  # held by rank 0 for the whole run
        self.wandb = _wandb_module(cfg)

    # -- setup --------------------------------------------------------------------------------------

    def _resume_point(self) -> tuple[Path | None, list[str]]:
        """Rank 0 alone locks the run, tidies it and picks (and hashes) the checkpoint; the other ranks get
        its choice, or its error, so every rank loads the same step or fails the same way."""
        choice: dict[str, Any] = {}
        failure: Exception | None = None
        if self.dist.is_main:
            try:
                path, notes = self._choose_checkpoint()
                choice = {"path": str(path) if path is not None else None, "notes": notes}
            except Exception as exc:  # noqa: BLE001 - passed on to the other ranks, then re-raised
                failure = exc
                choice = {"error": type(exc).__name__, "user": isinstance(exc, DdpmctlError), "message": str(exc)}
        if self.dist.enabled and dist.is_initialized():
            box = [choice]
            dist.broadcast_object_list(box, src=0, group=self.dist.host_group)
            choice = box[0]
        if failure is not None:
            raise failure
        if "error" in choice:
            kinds = {"ConfigError": ConfigError, "CheckpointError": CheckpointError, "DataError": DataError,
                     "RunInUseError": runlock.RunInUseError}
            kind = kinds.get(choice["error"], DdpmctlError) if choice["user"] else RuntimeError
            raise kind(choice["message"])
        return (Path(choice["path"]) if choice["path"] else None), list(choice["notes"])

    def _choose_checkpoint(self) -> tuple[Path | None, list[str]]:
        """Rank 0: take the run's lock (one process per run), tidy, and resolve the checkpoint to load."""
        which = self.cfg.training.resume_from_checkpoint
        self.lock.acquire(create=True)
        if self.cfg.data.path_to_data:  # before the grids' folder is made for a run whose data is gone (moved?)
            data_root(self.cfg.data.path_to_data)
        check_writable(self.cfg.generated_dir, "--generated-directory")  # now, not at the first grid hours later
        checkpoints.clean_stale_temporaries(self.run_dir)  # may put back a checkpoint a kill left aside
        if not which:
            existing = [c for c in checkpoints.list_checkpoints(self.run_dir) if c.complete]
            if existing:
                raise ConfigError(
                    f"{self.run_dir} already holds {existing[-1].name}; continue it with 'ddpmctl resume "
                    f"--experiment-name {self.cfg.run.experiment_name} --working-directory "
                    f"{self.cfg.run.working_directory}' or pick a new --experiment-name"
                )
            return None, []
        if which == "latest" and not checkpoints.list_checkpoints(self.run_dir):
            # Stopped (or killed) before its first save: nothing to lose, so resuming is starting over, as a
            # requeued job expects. Damaged checkpoint folders are another matter: resolve_checkpoint says why.
            return None, [f"{self.run_dir.name} has no checkpoint yet (it stopped before its first save): "
                          "starting from step 0"]
        return checkpoints.resolve_checkpoint(self.run_dir, which)

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        resume_path, notes = self._resume_point()
        self.notes = notes
        self.device = select_device(cfg.run.device, self.dist.local_rank)
        configure_backends(self.device)
        self.precision: Precision = resolve_precision(t.precision, self.device)
        if self.precision.note:
            self.notes.append(self.precision.note)
        if cfg.sampling.sampler == "ddpm" and cfg.sampling.sampling_steps is not None:
            self.notes.append(f"sampling_steps {cfg.sampling.sampling_steps} applies to --sampler ddim or dpmpp2m; "
                              f"the grids' ddpm sampler runs all {cfg.diffusion.num_diffusion_timesteps} steps")
        dataset, self.data_desc = build_dataset(cfg.data.path_to_data, cfg.model.img_size)
        self.num_images = len(dataset)  # type: ignore[arg-type]

        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = build_model(cfg).to(self.device)
        self.channels_last = t.channels_last and self.device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        set_low_precision_norms(model, low_precision_norms(self.device))
        self.model = model
        self.ema = EMA(model, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        # On CUDA the non-finite guard runs on the device (see run()): it needs fused AdamW's found_inf.
        self.deferred_guard = wants_deferred_guard(self.device, self.precision)
        self.optimizer = make_optimizer(model.parameters(), t.learning_rate, t.weight_decay, self.device,
                                        self.deferred_guard)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, t.warmup_steps, t.num_training_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_scaler)
        self.schedule = Schedule(cfg.diffusion, self.device)

        # More loader workers than cores (shared by torchrun's processes on this node): PyTorch warns of slowness
        # and freezes, so take what there is.
        workers = cfg.data.num_workers
        cores = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if workers > cores and not getattr(dataset, "in_process", False):
            self.notes.append(f"num_workers {workers} is more than the {cores} CPU cores here per process: "
                              f"using {cores}")
            workers = cores
        self.stream = BatchStream(
            dataset, t.batch_size, workers, pin_memory=self.device.type == "cuda",
            num_replicas=self.dist.world_size, rank=self.dist.rank, seed=cfg.run.seed,
        )
        self.step = 0
        self.skipped_total = 0
        if resume_path is not None:
            self._load(resume_path)
            if self.dist.is_main:  # resuming from an older step starts a new branch: the newer one goes aside
                self.notes += checkpoints.set_aside_newer(self.run_dir, resume_path)
        else:
            torch.manual_seed(cfg.run.seed + 7919 * self.dist.rank)  # per-rank noise and timesteps
        self.resumed_from = resume_path

        self.train_model: nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        self.grad_sync: GradSync | None = None
        cuda_graph = t.cuda_graph and self.deferred_guard
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.dist.enabled and cuda_graph and GradSync.supports(trainable) and graph_blocker(
                self.device, self.precision, t.gradient_accumulation_steps, distributed=False) is None:
            # A replayed graph beats DDP's overlap of communication and backward (H200, world size 1: 2,828
            # img/s with the graph in one process, 1,674 under DDP): all-reduce after each replay instead.
            self.grad_sync = GradSync(trainable)
            self.grad_sync.broadcast_from_rank0(self.model)
        elif self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        if t.compile:  # after DDP, as PyTorch advises: Dynamo then splits the graph at DDP's buckets
            self.train_model = torch.compile(self.train_model)
        self.train_step = TrainStep(
            self.model, self.train_model, self.schedule, self.precision, self.scaler, self.optimizer, self.device,
            loss_fn=cfg.diffusion.loss_fn, random_flip=cfg.data.random_flip, channels_last=self.channels_last,
            accumulation=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm, ddp=self.ddp,
            grad_sync=self.grad_sync, cuda_graph=cuda_graph, graph_batch=t.batch_size,
        )

    def _load(self, path: Path) -> None:
        meta = checkpoints.read_meta(path)
        diffs = model_config_differs(complete_saved(meta.get("config", {})), self.cfg)
        if diffs:
            raise CheckpointError(
                f"{path.name} was trained with different model settings: {'; '.join(diffs)}. "
                "Resume with the run's own settings ('ddpmctl resume' reads them from config.yaml)"
            )
        try:
            self._restore(path, meta)
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
        self._apply_new_optimizer_settings(meta.get("config", {}).get("training", {}))  # outside: its bugs keep tracebacks

    def _restore(self, path: Path, meta: dict[str, Any]) -> None:
        """Weights, EMA, optimizer, schedule, data position and RNG of ``path`` into this trainer."""
        self.model.load_state_dict(checkpoints.load_weights(path))
        state = checkpoints.load_training_state(path)
        if self.ema is not None:
            if (path / checkpoints.EMA).is_file():
                self.ema.model.load_state_dict(checkpoints.load_weights(path, checkpoints.EMA))
                self.ema.num_updates = int(state.get("ema_updates", 0))
            else:
                self.ema.model.load_state_dict(self.model.state_dict())
        load_optimizer_state(self.optimizer, state["optimizer"])
        # The schedule's lambda is rebuilt from this run's num_training_steps, so a resume may extend it.
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(meta["step"])
        if self.step >= self.cfg.training.num_training_steps:
            self.notes.append(f"{path.name} is at step {self.step} already (num_training_steps "
                              f"{self.cfg.training.num_training_steps}): pass a larger --num-training-steps to go on")
        self.skipped_total = int(state.get("skipped_steps", 0))
        data_state = meta.get("data_state", {})
        saved_data, data_now = meta.get("config", {}).get("data", {}).get("path_to_data"), self.cfg.data.path_to_data
        images_then = data_state.get("num_images", self.num_images)  # absent in checkpoints of older versions
        recounted = images_then != self.num_images
        same_world = self.dist.world_size == int(data_state.get("world_size", 1))
        # (older checkpoints hold the path as typed, relative to wherever training was started)
        if recounted or absolute_path(saved_data) != absolute_path(data_now):
            then = f"{saved_data} ({images_then} images)" if recounted else str(saved_data)
            self.notes.append(f"the data changed since {path.name}: {then} then, {data_now} "
                              f"({self.num_images} images) now; "
                              + ("the data order restarts at the next epoch" if recounted
                                 else "same number of images, so the data order goes on where it stopped"))
        if same_world and not recounted and "ranks" in data_state:
            self.stream.load_state_dict(data_state["ranks"][self.dist.rank])
        elif "ranks" in data_state:
            # Another number of processes or of images: continue from the next epoch (no sample is replayed
            # twice within an epoch, but the partial epoch is cut short).
            self.stream.load_state_dict({"epoch": data_state["ranks"][0]["epoch"] + 1, "position": 0})
            if not same_world:
                self.notes.append(f"world size changed from {data_state.get('world_size')} to "
                                  f"{self.dist.world_size}: data order restarts at the next epoch")
        rng = state.get("rng_per_rank", [state.get("rng")])
        if rng and rng[0] is not None:
            set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
            if self.dist.rank >= len(rng):
                torch.manual_seed(self.cfg.run.seed + 7919 * self.dist.rank + self.step)

    def _apply_new_optimizer_settings(self, saved: dict[str, Any]) -> None:
        """Options given on resuming win over the optimizer state just loaded, which carries the old ones.

        The loaded state restores the peak learning rate (the schedule's base) and the weight decay of
        the checkpoint; left alone, ``resume --learning-rate`` would be recorded in config.yaml and ignored.
        """
        t = self.cfg.training
        old_lr, old_wd = self.scheduler.base_lrs[0], self.optimizer.param_groups[0]["weight_decay"]
        schedule_changed = (saved.get("warmup_steps", t.warmup_steps) != t.warmup_steps
                            or saved.get("num_training_steps", t.num_training_steps) != t.num_training_steps)
        if old_lr == t.learning_rate and old_wd == t.weight_decay and not schedule_changed:
            return  # nothing changed: leave the loaded state bit for bit as saved
        self.scheduler.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)
        for group, lr_lambda in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = t.learning_rate
            group["weight_decay"] = t.weight_decay
            group["lr"] = t.learning_rate * lr_lambda(self.scheduler.last_epoch)  # the next step's rate, as step() would
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports
        if old_lr != t.learning_rate:
            self.notes.append(f"learning rate {old_lr:g} -> {t.learning_rate:g} from here on (the schedule keeps its shape)")
        if old_wd != t.weight_decay:
            self.notes.append(f"weight decay {old_wd:g} -> {t.weight_decay:g} from here on")

    # -- checkpoint & evaluation -------------------------------------------------------------------

    def _gather(self, obj: Any) -> list[Any]:
        if not self.dist.enabled:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj, group=self.dist.host_group)  # gloo: CPU objects, no GPU pickling
        return out

    def save(self, last_loss: float | None) -> Path | None:
        """All ranks gather their RNG/data state; rank 0 writes; everyone waits for the write."""
        rngs = self._gather(rng_state())
        data_states = self._gather(self.stream.state_dict())
        path = None
        if self.dist.is_main:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng_per_rank": rngs,
                "ema_updates": self.ema.num_updates if self.ema else 0,
                "skipped_steps": self.skipped_total,
            }
            meta = {
                "ddpmctl_version": __version__,
                "torch_version": torch.__version__,
                "config": to_dict(self.cfg),
                "data_state": {"world_size": self.dist.world_size, "num_images": self.num_images, "ranks": data_states},
                "loss": last_loss,
                "ema": self.ema is not None,
            }
            path = checkpoints.save_checkpoint(
                self.run_dir, self.step, self.model.state_dict(), training_state, meta,
                ema_state=self.ema.state_dict() if self.ema else None,
            )
            removed = checkpoints.rotate(self.run_dir, self.cfg.logging.num_keep_checkpoints, protect=path)
            self.emit(CheckpointSaved(self.step, str(path), [str(p) for p in removed]))
        barrier(self.dist)
        return path

    def evaluate(self) -> None:
        """Write step_<N>.png from fixed noise with the EMA weights (rank 0 only)."""
        if not self.dist.is_main:
            return
        self.emit(Evaluating(self.step))
        s = self.cfg.sampling
        net = self.ema.model if self.ema else self.model
        was_training = net.training
        net.eval()
        noise, gen = evaluation_noise(self.cfg, self.device)
        result = sample(
            net, self.schedule, noise, sampler=s.sampler, steps=s.sampling_steps, eta=s.eta, generator=gen,
            record_every=s.plot_freq_interval, max_frames=24, autocast=self.precision.autocast,
        )
        net.train(was_training)
        path = self.cfg.generated_dir / f"step_{self.step}.png"
        try:
            save_png(progression_grid(result, s.show_x0), path)
        except OSError as exc:  # a full disk or a folder gone read-only: the grid is not worth the run
            self.emit(Note(f"could not write {path}: {exc.strerror or exc}; training goes on without this grid"))
            return
        self.emit(GridSaved(self.step, str(path)))
        plots.loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if self.wandb is not None:
            self.wandb.log({"grid": self.wandb.Image(str(path))}, step=self.step)

    # -- the step ----------------------------------------------------------------------------------

    def _diverged(self, in_row: int, step: int) -> None:
        good = [c for c in checkpoints.list_checkpoints(self.run_dir) if c.complete]
        raise TrainingStopped(
            f"training diverged: {in_row} non-finite steps in a row at step {step}; "
            "lower --learning-rate or --max-grad-norm"
            + (f"; last good checkpoint: {good[-1].path}" if good else ""),
            checkpoint=str(good[-1].path) if good else None,
        )

    def _stop_requested(self) -> bool:
        if not self.dist.enabled:
            return self.stop.requested
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> TrainResult:
        self.setup()
        cfg, t = self.cfg, self.cfg.training
        accum = t.gradient_accumulation_steps
        per_step = t.batch_size * accum * self.dist.world_size  # images in a full optimizer step
        if self.dist.is_main:  # the run folder was created and tidied by _resume_point
            try:
                write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
                # Rows a killed run logged after its last checkpoint are about to be replayed (on a fresh start:
                # all rows of an attempt that never saved): drop them so that no step is logged twice.
                checkpoints.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            except OSError as exc:
                raise ConfigError(f"cannot write {exc.filename or self.run_dir}: {exc.strerror or exc}; pass a "
                                  "--working-directory you can write to") from None
        self.emit(TrainStarted(
            total_steps=t.num_training_steps, start_step=self.step, device=str(self.device),
            precision=self.precision.name, world_size=self.dist.world_size,
            parameters=sum(p.numel() for p in self.model.parameters()),
            effective_batch=per_step, data=self.data_desc,
            run_dir=str(self.run_dir), notes=self.notes,
        ))
        self.started = True
        if self.wandb is not None and self.dist.is_main:
            self.wandb.init(project=cfg.logging.wandb_project, name=cfg.run.experiment_name, config=to_dict(cfg),
                            dir=os.environ.get("WANDB_DIR") or str(self.run_dir), resume="allow")
        metrics_path = self.run_dir / "metrics.jsonl"
        self.train_model.train()
        start_time = time.perf_counter()
        window_start, window_images, window_steps = start_time, 0, 0
        loss_sum = torch.zeros((), device=self.device)
        last_loss: float | None = None
        bad_in_row = 0
        bad_run = torch.zeros((), device=self.device)  # deferred guard: non-finite steps in a row, on the device
        bad_window = torch.zeros((), device=self.device)  # deferred guard: skipped since the last read-back
        images_done = 0
        last_saved: Path | None = self.resumed_from  # what a run resumed at its last step ends with
        saved_step = -1
        graph_checked = False
        try:
            while self.step < t.num_training_steps:
                batches = [next(self.stream) for _ in range(accum)]
                step_loss, grad_norm, check = self.train_step.forward_backward(batches)
                if self.grad_sync is not None and not graph_checked:  # only rank 0 speaks: count the others
                    graph_checked = True
                    failed = torch.tensor([float(self.train_step.graph is None)], device=self.device)
                    dist.all_reduce(failed)
                    if failed.item() and not self.train_step.graph_note:
                        self.train_step.graph_note = (f"CUDA graph capture failed on {int(failed.item())} of "
                                                      f"{self.dist.world_size} ranks; they train without it")
                if self.train_step.graph_note:
                    self.emit(Note(self.train_step.graph_note))
                    self.train_step.graph_note = None
                # Skip the update if the loss or any gradient is not finite.
                if self.dist.enabled:  # every rank must take the same decision: a sum is finite only if all are
                    check = check.detach().float().reshape(1)
                    dist.all_reduce(check)
                if self.deferred_guard:
                    # No host wait: fused AdamW skips the update on the device when found_inf is 1 (the
                    # mechanism GradScaler uses); the step still counts. Skips are read back with the loss.
                    bad = (~torch.isfinite(check)).reshape(()).float()
                    bad_run = (bad_run + 1) * bad
                    bad_window += bad
                elif not bool(torch.isfinite(check).all()):
                    self.train_step.zero_grad()
                    self.scaler.update()
                    bad_in_row += 1
                    self.skipped_total += 1
                    self.emit(Note(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                                   f"({bad_in_row} in a row)"))
                    if bad_in_row >= t.max_bad_steps:
                        self._diverged(bad_in_row, self.step + 1)  # skipped tries of the same step, as the notes say
                    continue
                bad_in_row = 0
                self.train_step.apply(self.scheduler, self.ema, bad if self.deferred_guard else None)
                self.step += 1
                loss_sum += step_loss
                n_images = sum(b.shape[0] for b in batches) * self.dist.world_size  # a short last batch: what it holds
                window_images += n_images
                images_done += n_images
                window_steps += 1

                if self.step % cfg.logging.log_interval == 0 or self.step == t.num_training_steps:
                    if self.dist.enabled:
                        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                        loss_sum /= self.dist.world_size
                    last_loss = float(loss_sum) / window_steps
                    if self.deferred_guard and float(bad_window) > 0:
                        skipped, in_row = int(bad_window), int(bad_run)
                        self.skipped_total += skipped
                        bad_window.zero_()
                        self.emit(Note(f"steps {self.step - window_steps + 1}-{self.step}: {skipped} non-finite "
                                       f"loss or gradient, update skipped ({in_row} in a row now)"))
                        if in_row >= t.max_bad_steps:
                            self._diverged(in_row, self.step)  # skipped steps count on this path
                    now = time.perf_counter()
                    speed = window_images / max(now - window_start, 1e-9)
                    lr = self.scheduler.get_last_lr()[0]
                    stats = StepStats(
                        self.step, t.num_training_steps, last_loss, lr, speed, float(grad_norm), now - start_time,
                        (t.num_training_steps - self.step) * per_step / max(speed, 1e-9), self.skipped_total,
                    )
                    self.emit(stats)
                    if self.dist.is_main:
                        with open(metrics_path, "a") as fh:
                            fh.write(json.dumps({
                                "step": self.step, "loss": last_loss, "lr": lr, "images_per_sec": speed,
                                "grad_norm": stats.grad_norm, "time": time.time(),
                            }) + "\n")
                        if self.wandb is not None:
                            self.wandb.log({"loss": last_loss, "lr": lr, "images_per_sec": speed,
                                            "grad_norm": stats.grad_norm}, step=self.step)
                    loss_sum.zero_()
                    window_start, window_images, window_steps = now, 0, 0

                if self.step % cfg.sampling.evaluation_interval == 0 or self.step == t.num_training_steps:
                    last_saved, saved_step = self.save(last_loss), self.step
                    self.evaluate()
                    barrier(self.dist)  # the other ranks wait on the host group (long timeout) while rank 0 samples
                # Under torchrun agreeing on a stop costs a collective: ask only when the loss is read anyway.
                at_log = self.step % cfg.logging.log_interval == 0 or self.step % cfg.sampling.evaluation_interval == 0
                if (at_log or not self.dist.enabled) and self._stop_requested():
                    break
        finally:
            self.stream.close()
        elapsed = time.perf_counter() - start_time
        if self.step < t.num_training_steps:  # stopped by a signal
            if saved_step != self.step:
                last_saved = self.save(last_loss)
            if self.wandb is not None and self.dist.is_main:
                self.wandb.finish()
            raise TrainingStopped(
                f"interrupted ({self.stop.reason}) at step {self.step}; saved {last_saved}", str(last_saved), 130
            )
        if self.wandb is not None and self.dist.is_main:
            self.wandb.finish()
        self.emit(TrainFinished(self.step, str(last_saved) if last_saved else None, elapsed,
                                images_done / max(elapsed, 1e-9), self.skipped_total))
        return TrainResult(self.step, str(last_saved) if last_saved else None, str(self.run_dir))
