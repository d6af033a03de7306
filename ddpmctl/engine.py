"""The training loop. It never prints: progress goes out as events to a callback the CLI renders.

One call, :func:`train`, runs a whole run (fresh or resumed) on one process or under torchrun:
data -> the training step (parts.py / step.py: forward process, network, loss, AdamW with a cosine
schedule, EMA, accumulation, clipping, the non-finite guard) -> periodic reports, checkpoints and
progression grids, and a clean stop on Ctrl-C / SIGTERM that saves a checkpoint first. What a
checkpoint carries, and where a resumed run starts, is run_state.py's business.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoints, plots, rundir
from .augment import AUGMENT_DIM
from .classes import fit_to_data, saved_network
from .config import Config, dump_yaml, to_dict, with_absolute_paths
from .data import BatchStream, build_dataset, upscale_note
from .errors import ConfigError, TrainingStopped
from .estimate import grid_denoise_steps, grid_note
from .events import CheckpointSaved, Evaluating, Event, GridProgress, GridSaved, Note, StepStats, TrainFinished, TrainStarted
from .files import missing_folders, remove_empty_folders, write_text_atomic
from .host import cpu_cores
from .interrupts import StopFlag, interrupt_handlers
from .labeled import batch_images
from .layout import LOSS_PLOT, METRICS, RUN_CONFIG, grid_name
from .log_window import LogWindow
from .machine import device_notes
from .memorization import check_samples
from .memorization_io import reference_for_dataset
from .parts import build_parts
from .pretrained import fine_tuning_config, load_pretrained
from .run_state import RunState, resume_point
from .runlock import RunLock
from .runtime import (
    DistInfo,
    barrier,
    configure_backends,
    generator_device,
    init_distributed,
    release_cached_memory,
    resolve_precision,
    select_device,
)
from .sampling import DEFAULT_GUIDANCE, MAX_CLASS_ROWS, progression_grid, sample, sampling_network, save_png, to_uint8
from .validation import check_attention_resolutions


def evaluation_noise(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Generator]:
    """Fixed x_T and sampler generator, so grids from different steps are comparable.

    A row per sample: num_generations of them, or one per class (the first MAX_CLASS_ROWS) for a class-conditional run.
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.run.seed + 1_000_003)
    size, classes = cfg.model.img_size, len(cfg.model.class_names)
    rows = min(classes, MAX_CLASS_ROWS) if classes else cfg.sampling.num_generations
    noise = torch.randn((rows, 3, size, size), generator=gen)
    step_gen = torch.Generator(device=generator_device(device)).manual_seed(cfg.run.seed + 2_000_003)
    return noise.to(device), step_gen


def _wandb_module(cfg: Config) -> Any:
    if not cfg.logging.use_wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("--use-wandb needs Weights & Biases: pip install 'ddpmctl[wandb]'") from None
    return wandb


def loader_workers(requested: int, dataset: Any) -> tuple[int, str | None]:
    """The DataLoader workers to start, and a note when that is fewer than ``requested``."""
    # More loader workers than cores (shared by torchrun's processes on this node): PyTorch warns of slowness
    # and freezes, so take what there is.
    cores = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if requested > cores and not getattr(dataset, "in_process", False):
        return cores, f"num_workers {requested} is more than the {cores} CPU cores here per process: using {cores}"
    return requested, None


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
    if not cfg.training.resume_from_checkpoint and not cfg.training.init_from:  # saved runs keep their setting
        check_attention_resolutions(cfg.model)
    dist_info = init_distributed(cfg.run.device)
    created = missing_folders(cfg.run_dir, cfg.generated_dir) if dist_info.is_main else []
    try:
        with interrupt_handlers(stop):
            trainer = Trainer(cfg, dist_info, emit, stop)
            try:
                return trainer.run()
            finally:
                # A start that failed (bad data, Ctrl-C) leaves no empty folders behind, tidied only by the
                # process that held the run's lock (never a run another process has just begun).
                tidy = trainer.lock.held and not trainer.started
                if tidy and cfg.run_dir in created:
                    (cfg.run_dir / RUN_CONFIG).unlink(missing_ok=True)
                trainer.lock.release()  # taken by rank 0 in resume_point; removes the lock file
                if tidy:
                    remove_empty_folders(created)
    finally:
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One run on this process: set up from the config (resumed or fresh), then loop until done or stopped."""

    def __init__(self, cfg: Config, dist_info: DistInfo, emit: Callable[[Event], None], stop: StopFlag):
        self.cfg, self.dist, self.stop = cfg, dist_info, stop
        self.started = False  # set once training begins: a failure before that tidies away the folders it made
        self.emit = emit if dist_info.is_main else (lambda _e: None)  # other ranks stay quiet
        self.lock = RunLock(cfg.run_dir)  # held by rank 0 for the whole run
        self.wandb = _wandb_module(cfg)

    def setup(self) -> None:
        resume_path, self.notes = resume_point(self.cfg, self.dist, self.lock)
        weights = self._start_from_trained_weights() if resume_path is None and self.cfg.training.init_from else None
        cfg, t = self.cfg, self.cfg.training
        self.device = select_device(cfg.run.device, self.dist.local_rank)
        configure_backends(self.device)
        self.precision = resolve_precision(t.precision, self.device)
        if self.precision.note:
            self.notes.append(self.precision.note)
        self.notes += device_notes(cfg, self.device)  # MPS: the memory limit in force, options slow there
        if cfg.sampling.sampler == "ddpm" and cfg.sampling.sampling_steps is not None:
            self.notes.append(f"sampling_steps {cfg.sampling.sampling_steps} applies to --sampler ddim or dpmpp2m; "
                              f"the grids' ddpm sampler runs all {cfg.diffusion.num_diffusion_timesteps} steps")
        # A new network takes its classes (and dropout) from the data; a resumed or fine-tuned one has its own.
        fresh = resume_path is None and not cfg.training.init_from
        if resume_path is not None:
            self.cfg = cfg = saved_network(cfg, checkpoints.read_meta(resume_path).get("config", {}))
        classes = cfg.data.classes if fresh else (cfg.model.class_names or "none")
        dataset, self.data_desc = build_dataset(cfg.data.path_to_data, cfg.model.img_size, classes)
        names, labels = getattr(dataset, "class_names", ()), getattr(dataset, "labels", ())
        self.cfg, fitted = fit_to_data(cfg, names, labels, len(dataset), fresh, AUGMENT_DIM)
        self.notes += fitted
        cfg = self.cfg
        self.dataset, self.copies_reference = dataset, None  # the memorization check's, built at the first grid
        small = upscale_note(dataset, cfg.model.img_size) if self.dist.is_main else None
        if small:
            self.notes.append(small)
        self.parts = build_parts(cfg, self.device, self.precision, self.dist, weights)
        workers, note = loader_workers(cfg.data.num_workers, dataset)
        self.notes += [note] if note else []
        self.stream = BatchStream(dataset, t.batch_size, workers, pin_memory=self.device.type == "cuda",
                                  num_replicas=self.dist.world_size, rank=self.dist.rank, seed=cfg.run.seed)
        self.state = RunState(cfg, self.parts, self.stream, self.dist, len(dataset))  # type: ignore[arg-type]
        if resume_path is not None:
            self.notes += self.state.load(resume_path)
            if self.dist.is_main:  # resuming from an older step starts a new branch: the newer one goes aside
                self.notes += rundir.set_aside_newer(cfg.run_dir, resume_path)
        else:
            torch.manual_seed(cfg.run.seed + 7919 * self.dist.rank)  # per-rank noise and timesteps
        self.resumed_from = resume_path

    def _start_from_trained_weights(self) -> dict[str, torch.Tensor]:
        """--init-from: the run takes the weights' network and diffusion settings; optimizer and EMA start fresh."""
        pre = load_pretrained(self.cfg.training.init_from)
        self.cfg, ignored = fine_tuning_config(self.cfg, pre)
        what = ("EMA weights" if pre.ema else "weights") + (f" of step {pre.step}" if pre.step is not None else "")
        t = self.cfg.training
        self.notes += [f"fine-tuning {what} from {pre.source}: its network and diffusion settings, a fresh optimizer "
                       f"and EMA, learning rate {t.learning_rate:g} after {t.warmup_steps} warm-up steps",
                       *pre.notes, *ignored]
        return pre.weights

    def _start(self) -> None:
        """Write config.yaml, drop metric rows that are about to be replayed, announce the run."""
        cfg, t, run_dir = self.cfg, self.cfg.training, self.cfg.run_dir
        if self.dist.is_main:  # the run folder was created and tidied by resume_point
            try:
                write_text_atomic(run_dir / RUN_CONFIG, dump_yaml(cfg))
                # Rows a killed run logged after its last checkpoint are about to be replayed (on a fresh start:
                # all rows of an attempt that never saved): drop them so that no step is logged twice.
                rundir.truncate_metrics(run_dir / METRICS, self.state.step)
            except OSError as exc:
                raise ConfigError(f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}; pass a "
                                  "--working-directory you can write to") from None
        self.emit(TrainStarted(
            total_steps=t.num_training_steps, start_step=self.state.step, device=str(self.device),
            precision=self.precision.name, world_size=self.dist.world_size,
            parameters=sum(p.numel() for p in self.parts.model.parameters()),
            effective_batch=t.batch_size * t.gradient_accumulation_steps * self.dist.world_size,
            data=self.data_desc, run_dir=str(run_dir), notes=self.notes,
        ))
        self.started = True
        if self.wandb is not None and self.dist.is_main:
            self.wandb.init(project=cfg.logging.wandb_project, name=cfg.run.experiment_name, config=to_dict(cfg),
                            dir=os.environ.get("WANDB_DIR") or str(run_dir), resume="allow")

    def run(self) -> TrainResult:
        self.setup()
        self._start()
        cfg, t, state = self.cfg, self.cfg.training, self.state
        window = LogWindow(self.device)
        self.last_loss: float | None = None
        last_saved, saved_at = self.resumed_from, -1  # what a run resumed at its last step ends with
        first_step = state.step + 1  # this process's first: its figures show at once, not at the first log interval
        self.parts.step.train_model.train()
        started = time.perf_counter()
        try:
            while state.step < t.num_training_steps:
                # Accumulate gradients and update: a non-finite step is skipped, and counted, on every device.
                batches = [next(self.stream) for _ in range(t.gradient_accumulation_steps)]
                result = self.parts.step.step(batches)
                state.step += 1
                images = sum(batch_images(b).shape[0] for b in batches)  # a short last batch too
                window.add(result, images * self.dist.world_size)
                if self.parts.step.graph_note:
                    self.emit(Note(self.parts.step.graph_note))
                    self.parts.step.graph_note = None
                last = state.step == t.num_training_steps
                # Report the loss: most steps never wait for the device, this one does.
                at_log = state.step % cfg.logging.log_interval == 0
                if at_log or last:
                    self._report(window, time.perf_counter() - started)
                elif state.step == first_step:
                    self._report(window, time.perf_counter() - started, logged=False)
                if state.step == first_step:  # the grids' sampler and cost, timed by this step
                    per_image = (time.perf_counter() - started) * self.dist.world_size / max(window.images_total, 1)
                    self.emit(Note(grid_note(cfg, per_image, state.step - 1)))
                # Save a checkpoint and a progression grid.
                at_eval = state.step % cfg.sampling.evaluation_interval == 0
                if at_eval or last:
                    last_saved, saved_at = self._save(window), state.step
                    self._evaluate()
                    barrier(self.dist)  # the other ranks wait on the host group (long timeout) while rank 0 samples
                # Stop when asked: under torchrun agreeing costs a collective, so only where the loss is read anyway.
                if (at_log or at_eval or not self.dist.enabled) and self._stop_requested():
                    break
        finally:
            self.stream.close()
        # Finish: a stop saves where it is; the end of the run was saved above.
        elapsed = time.perf_counter() - started
        if state.step < t.num_training_steps:
            if saved_at != state.step:
                last_saved = self._save(window)
            if self.wandb is not None and self.dist.is_main:
                self.wandb.finish()
            raise TrainingStopped(
                f"interrupted ({self.stop.reason}) at step {state.step}; saved {last_saved}", str(last_saved), 130)
        if self.wandb is not None and self.dist.is_main:
            self.wandb.finish()
        self.emit(TrainFinished(state.step, str(last_saved) if last_saved else None, elapsed,
                                window.images_total / max(elapsed, 1e-9), state.skipped))
        return TrainResult(state.step, str(last_saved) if last_saved else None, str(self.cfg.run_dir))

    def _report(self, window: LogWindow, elapsed: float, logged: bool = True) -> None:
        """Read the window back: skipped-step notes (and the divergence stop), StepStats, a metrics row.

        ``logged`` False (the first step of a process, before its first log interval): StepStats only, for the
        display; the window, the skip count and metrics.jsonl wait for the report at the log interval, so a
        resumed run logs the same rows as one trained straight through.
        """
        t, step = self.cfg.training, self.state.step
        read = window.read(self.dist, reset=logged)
        if not logged:
            speed = read["images_per_sec"]
            loss = read["loss"] if read["loss"] is not None else self.last_loss
            self.emit(StepStats(step, t.num_training_steps, loss, self.parts.scheduler.get_last_lr()[0], speed,
                                read["grad_norm"], elapsed, (t.num_training_steps - step) * elapsed / read["steps"],
                                self.state.skipped + read["skipped"], logged=False))
            return
        if read["skipped"]:
            self.state.skipped += read["skipped"]
            where = f"step {step}" if read["steps"] == 1 else f"steps {step - read['steps'] + 1}-{step}"
            self.emit(Note(f"{where}: {read['skipped']} non-finite loss or gradient, update skipped "
                           f"({read['in_row']} in a row now)"))
            if read["in_row"] >= t.max_bad_steps:
                self._diverged(read["in_row"], step)
        if read["loss"] is not None:
            self.last_loss = read["loss"]
        speed = read["images_per_sec"]
        per_step = t.batch_size * t.gradient_accumulation_steps * self.dist.world_size
        lr = self.parts.scheduler.get_last_lr()[0]
        self.emit(StepStats(step, t.num_training_steps, self.last_loss, lr, speed, read["grad_norm"], elapsed,
                            (t.num_training_steps - step) * per_step / max(speed, 1e-9), self.state.skipped))
        if self.dist.is_main:
            row = {"step": step, "loss": self.last_loss, "lr": lr, "images_per_sec": speed,
                   "grad_norm": read["grad_norm"], "time": time.time()}
            with open(self.cfg.run_dir / METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log({k: row[k] for k in ("loss", "lr", "images_per_sec", "grad_norm")}, step=step)

    def _save(self, window: LogWindow) -> Path | None:
        """Checkpoint this step (skips not yet reported included), then rotate the old ones away (rank 0)."""
        path = self.state.save(self.last_loss, unreported_skips=int(window.skipped))
        if path is not None:
            removed = rundir.rotate(self.cfg.run_dir, self.cfg.logging.num_keep_checkpoints, protect=path)
            self.emit(CheckpointSaved(self.state.step, str(path), [str(p) for p in removed]))
        barrier(self.dist)
        return path

    def _evaluate(self) -> None:
        """Write step_<N>.png from fixed noise with the EMA weights (rank 0 only)."""
        if not self.dist.is_main:
            return
        step, s, run_dir = self.state.step, self.cfg.sampling, self.cfg.run_dir
        self.emit(Evaluating(step, s.sampler, grid_denoise_steps(self.cfg)))
        net = self.parts.ema.model if self.parts.ema else self.parts.model
        was_training = net.training
        net.eval()
        noise, gen = evaluation_noise(self.cfg, self.device)
        started, shown = time.perf_counter(), [0.0]

        def progress(done: int, total: int) -> None:  # at most one event a second: the CLI shows the grid's ETA
            now = time.perf_counter()
            if done == total or now - shown[0] >= 1.0:
                shown[0] = now
                self.emit(GridProgress(step, done, total, now - started, (now - started) / done * (total - done)))

        conditional = bool(self.cfg.model.class_names)  # then row i shows class i
        result = sample(
            sampling_network(net, self.parts.schedule), self.parts.schedule, noise, sampler=s.sampler,
            steps=s.sampling_steps, eta=s.eta, generator=gen, record_every=s.plot_freq_interval, max_frames=24,
            autocast=self.precision.autocast,
            labels=torch.arange(noise.shape[0], device=self.device) if conditional else None,
            guidance=DEFAULT_GUIDANCE if conditional else 0.0, callback=progress,
        )
        net.train(was_training)
        release_cached_memory(self.device)  # the grid's shapes are not training's: MPS would keep their blocks
        path = self.cfg.generated_dir / grid_name(step)
        try:
            save_png(progression_grid(result, s.show_x0), path)
        except OSError as exc:  # a full disk or a folder gone read-only: the grid is not worth the run
            self.emit(Note(f"could not write {path}: {exc.strerror or exc}; training goes on without this grid"))
            return
        self.emit(GridSaved(step, str(path)))
        if self.cfg.logging.memorization_check:
            if self.copies_reference is None:  # reads the training images once, at the first evaluation
                self.copies_reference = reference_for_dataset(self.dataset, self.cfg.model.img_size)
            copies = check_samples(to_uint8(result.images), self.copies_reference)
            self.emit(Note(f"step {step}, memorization of the grid's samples: {copies.line()}"))
        plots.loss_curve(run_dir / METRICS, run_dir / LOSS_PLOT)
        if self.wandb is not None:
            self.wandb.log({"grid": self.wandb.Image(str(path))}, step=step)

    def _diverged(self, in_row: int, step: int) -> None:
        good = [c for c in rundir.list_checkpoints(self.cfg.run_dir) if c.complete]
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
