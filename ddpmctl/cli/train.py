"""``ddpmctl train`` and ``ddpmctl resume``: resolve the config, run the engine, render its events."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import config as config_mod
from ..engine import train
from ..errors import TrainingStopped
from ..events import CheckpointSaved, Evaluating, Event, GridSaved, Note, StepStats, TrainFinished, TrainStarted
from .common import console, err_console, fail, handle_errors
from .options import with_config_options


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
            console.print(f"data: {event.data}", highlight=False)
            console.print(f"run folder: {event.run_dir}", highlight=False)
            for note in event.notes:
                console.print(f"[yellow]note:[/] {note}", highlight=False)
            self.progress.start()
            self.task = self.progress.add_task(
                "training", total=event.total_steps, completed=event.start_step, loss="-", lr="-", speed="-", eta="-")
        elif isinstance(event, StepStats):
            self.last = event
            self.progress.update(
                self.task, completed=event.step, description="training", loss=f"{event.loss:.4f}",
                lr=f"{event.lr:.2e}", speed=f"{event.images_per_sec:,.0f}", eta=_duration(event.eta),
            )
        elif isinstance(event, Evaluating):
            self.progress.update(self.task, description="sampling grid")
        elif isinstance(event, GridSaved):
            self.progress.update(self.task, description="training")
            loss = f", loss {self.last.loss:.4f}, {self.last.images_per_sec:,.0f} img/s" if self.last else ""
            self.progress.console.print(f"step {event.step}{loss}: grid {event.path}", highlight=False)
        elif isinstance(event, CheckpointSaved):
            gone = f" (removed {', '.join(Path(p).name for p in event.removed)})" if event.removed else ""
            self.progress.console.print(f"step {event.step}: saved {event.path}{gone}", highlight=False)
        elif isinstance(event, Note):
            self.progress.console.print(f"[yellow]note:[/] {event.text}", highlight=False)
        elif isinstance(event, TrainFinished):
            self.stop()
            console.print(
                f"[green]done[/]: {event.step} steps in {_duration(event.elapsed)} "
                f"({event.images_per_sec:,.1f} img/s overall); last checkpoint {event.checkpoint}", highlight=False,
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


def run_training(cfg: config_mod.Config) -> None:
    display = TrainDisplay()
    try:
        train(cfg, display)
    except TrainingStopped as exc:
        display.stop()
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank stops together; rank 0 says why
            raise typer.Exit(exc.exit_code) from None
        if exc.exit_code == 130:
            err_console.print(f"[yellow]{exc}[/]", highlight=False)
            err_console.print(f"resume with: {_resume_hint(cfg)}", highlight=False)
            raise fail("training was interrupted", 130) from None
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: the engine stopped at once, discarding any half-written save
        display.stop()
        if int(os.environ.get("RANK", "0")) == 0:
            err_console.print("stopped at once (second Ctrl-C): steps since the last complete checkpoint are "
                              f"lost; resume with: {_resume_hint(cfg)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        display.stop()


@handle_errors
def train_command(config_file: Path | None, overrides: dict[str, Any]) -> None:
    """Train a new run (or, with --resume-from-checkpoint, continue one as the original script did)."""
    if overrides.get("resume_from_checkpoint"):
        cfg = config_mod.resolve_for_resume(config_file, overrides)
    else:
        cfg = config_mod.resolve(config_file, overrides)
    run_training(cfg)


@handle_errors
def resume_command(config_file: Path | None, overrides: dict[str, Any]) -> None:
    """Continue a run from its latest (or --resume-from-checkpoint) checkpoint; config.yaml has the rest."""
    run_training(config_mod.resolve_for_resume(config_file, overrides))


train_cmd = with_config_options(train_command)
resume_cmd = with_config_options(resume_command)
