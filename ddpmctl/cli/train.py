"""``ddpmctl train`` and ``ddpmctl resume``: resolve the config, run the engine, render its events."""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import config as config_mod
from ..engine import train
from ..errors import TrainingStopped
from ..estimate import duration
from ..events import CheckpointSaved, Evaluating, Event, GridProgress, GridSaved, Note, StepStats, TrainFinished, TrainStarted
from ..interrupts import StopFlag
from ..layout import RUN_CONFIG
from ..pretrained import fine_tuning_base
from .common import console, err_console, handle_errors, interrupted, plural
from .dryrun import DRY_RUN, show_plan
from .options import with_config_options

NOT_STARTED = "interrupted before training started; nothing was saved"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _speed(images_per_sec: float) -> str:
    """Whole images/s, or two significant digits below 10 (a 128 px run on a CPU trains ~1 image/s)."""
    return f"{images_per_sec:,.0f}" if images_per_sec >= 10 else f"{images_per_sec:.2g}"


class TrainDisplay:
    """Turns engine events into a live progress line plus a log of saves and grids."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} img/s"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=console, transient=False,
        )
        self.task = None
        self.last: StepStats | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            what = "resuming at step" if event.start_step else "starting at step"
            console.print(
                f"[bold]ddpmctl train[/]: {event.parameters / 1e6:.2f}M parameters on {event.device} "
                f"({event.precision}), world size {event.world_size}, effective batch {event.effective_batch}, "
                f"{what} {event.start_step} of {event.total_steps}", highlight=False, soft_wrap=True,
            )  # soft_wrap: one line in log files too, so `grep "world size"` finds it
            # soft_wrap here and below: paths and commands stay whole in log files, to copy
            console.print(f"data: {event.data}", highlight=False, soft_wrap=True)
            console.print(f"run folder: {event.run_dir}", highlight=False, soft_wrap=True)
            for note in event.notes:
                console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
            self.progress.start()
            self.task = self.progress.add_task(
                "training", total=event.total_steps, completed=event.start_step, loss="-", lr="-", speed="-", eta="-")
        elif isinstance(event, StepStats):
            self.last = event
            # The first step's figures (before the first log interval) include start-up costs: an estimate.
            eta = duration(event.eta) if event.logged else f"~{duration(event.eta)}"
            self.progress.update(
                self.task, completed=event.step, description="training", loss=_loss(event.loss),
                lr=f"{event.lr:.2e}", speed=_speed(event.images_per_sec), eta=eta,
            )
        elif isinstance(event, Evaluating):
            what = f" ({event.sampler}, {event.denoise_steps} steps)" if event.sampler else ""
            self.progress.update(self.task, description=f"sampling grid{what}")
        elif isinstance(event, GridProgress):
            self.progress.update(self.task, description=f"sampling grid {event.done}/{event.total}, "
                                                        f"{duration(event.eta)} left")
        elif isinstance(event, GridSaved):
            self.progress.update(self.task, description="training")
            loss = f", loss {_loss(self.last.loss)}, {_speed(self.last.images_per_sec)} img/s" if self.last else ""
            self.progress.console.print(f"step {event.step}{loss}: grid {event.path}", highlight=False, soft_wrap=True)
        elif isinstance(event, CheckpointSaved):
            gone = f" (removed {', '.join(Path(p).name for p in event.removed)})" if event.removed else ""
            self.progress.console.print(f"step {event.step}: saved {event.path}{gone}", highlight=False, soft_wrap=True)
        elif isinstance(event, Note):
            self.progress.console.print(f"[yellow]note:[/] {event.text}", highlight=False, soft_wrap=True)
        elif isinstance(event, TrainFinished):
            self.stop()
            console.print(
                f"[green]done[/]: {event.step} {plural(event.step, 'step')} in {duration(event.elapsed)} "
                f"({event.images_per_sec:,.1f} img/s overall); last checkpoint {event.checkpoint}", highlight=False,
                soft_wrap=True,
            )

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


def _resume_hint(cfg: config_mod.Config) -> str:
    hint = (f"ddpmctl resume --experiment-name {shlex.quote(cfg.run.experiment_name)} "
            f"--working-directory {shlex.quote(cfg.run.working_directory)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: resume the same way
        hint = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', 'N')} [rendezvous options] -m {hint}"
    return hint


def _is_main_rank() -> bool:
    """Rank 0 under torchrun (its RANK variable), or a plain single process: the one that speaks."""
    return int(os.environ.get("RANK", "0")) == 0


def run_training(cfg: config_mod.Config) -> None:
    display = TrainDisplay()
    stop = StopFlag()  # set by the engine's handler: tells a second Ctrl-C from one before the handler was in place
    main_rank = _is_main_rank()  # under torchrun every rank stops together; rank 0 says why
    try:
        train(cfg, display, stop)
    except TrainingStopped as exc:
        display.stop()
        if not main_rank:
            raise typer.Exit(exc.exit_code) from None
        if exc.exit_code == 130 and exc.checkpoint:
            # A clean stop saved its checkpoint: no Error line after it, the resume command ends the output.
            # soft_wrap: a log file (80 columns, not a terminal) keeps the command on one line, to copy.
            err_console.print(f"[yellow]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
            err_console.print(f"resume with: {escape(_resume_hint(cfg))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        raise
    except KeyboardInterrupt:
        display.stop()
        if not main_rank:
            raise typer.Exit(130) from None
        if not stop.requested and display.task is None:  # before the engine's own handler was installed
            raise interrupted(NOT_STARTED) from None
        # A second Ctrl-C: the engine stopped at once, discarding any half-written save.
        err_console.print("stopped at once (second Ctrl-C): steps since the last complete checkpoint are "
                          f"lost; resume with: {escape(_resume_hint(cfg))}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        display.stop()


@contextlib.contextmanager
def _before_training() -> Iterator[None]:
    """A Ctrl-C while the run is resolved (before the engine's handler saves anything) stops with one line."""
    try:
        yield
    except KeyboardInterrupt:
        raise interrupted(NOT_STARTED) from None


@handle_errors
def train_command(config_file: Path | None, overrides: dict[str, Any], dry_run: bool = False) -> None:
    """Train a new run (or, with --resume-from-checkpoint, continue one as the original script did)."""
    with _before_training():
        cfg = config_mod.resolve(config_file, overrides)
        which = cfg.training.resume_from_checkpoint
        if which == "latest" and not (cfg.run_dir / RUN_CONFIG).is_file():
            # As in the accelerate/diffusers scripts the original followed: 'latest' with no run yet starts one, so a
            # job script that always passes it works on its first submission. (Under torchrun every rank looks
            # before rank 0 can write config.yaml: they all join the process group first.)
            cfg = config_mod.apply_overrides(cfg, {"resume_from_checkpoint": None})
            if _is_main_rank():
                console.print(f"[yellow]note:[/] no run at {escape(str(cfg.run_dir))} to resume from 'latest': "
                              "starting a new one", highlight=False, soft_wrap=True)
        elif which:
            cfg = config_mod.resolve_for_resume(config_file, overrides)
        if cfg.training.init_from and not cfg.training.resume_from_checkpoint:  # fine-tuning: its own defaults
            cfg = config_mod.resolve(config_file, overrides, base=fine_tuning_base())
        if dry_run:
            return show_plan(cfg)
    run_training(cfg)


@handle_errors
def resume_command(config_file: Path | None, overrides: dict[str, Any], dry_run: bool = False) -> None:
    """Continue a run from its latest (or --resume-from-checkpoint) checkpoint; config.yaml has the rest."""
    with _before_training():
        cfg = config_mod.resolve_for_resume(config_file, overrides)
        if dry_run:
            return show_plan(cfg)
    run_training(cfg)


train_cmd = with_config_options(train_command, (DRY_RUN,))
resume_cmd = with_config_options(resume_command, (DRY_RUN,))
