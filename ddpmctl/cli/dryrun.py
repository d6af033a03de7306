"""``train --dry-run`` and ``resume --dry-run``: show what the run would do and cost; nothing is written."""

from __future__ import annotations

import inspect
import os
from typing import Annotated

import typer
from rich.markup import escape

from .. import config as config_mod
from ..dryrun import GRID_FILES, RUN_FILES, ResumePlan, TrainPlan, plan_resume, plan_train
from ..errors import ConfigError
from ..estimate import duration
from .common import console, err_console

DRY_RUN = inspect.Parameter(
    "dry_run", inspect.Parameter.KEYWORD_ONLY, default=False,
    annotation=Annotated[bool, typer.Option(
        "--dry-run", help="show the resolved config, the model's size, the estimated memory and time (from a few "
                          "real steps) and the folders it would write, then exit without writing anything")],
)


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)  # soft_wrap: paths and commands stay whole, to copy


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _folder(path: str, exists: bool) -> str:
    return f"{escape(path)} ({'exists' if exists else 'would be created'})"


def render_train(plan: TrainPlan) -> None:
    """The plan of a new run, as the lines a user reads before starting it."""
    t = plan.timing
    _say("[bold]ddpmctl train --dry-run[/]: nothing was written; the run would be:")
    _say("config (resolved):")
    for line in plan.config_yaml.rstrip().splitlines():
        _say(f"  {escape(line)}")
    _say(f"model: {plan.parameters / 1e6:.2f}M parameters, {plan.flops_per_image / 1e9:,.1f} GFLOPs per image "
         "(forward + backward)")
    _say(f"device: {plan.device} ({plan.precision}), {plan.images_per_step} images per step")
    _say(f"data: {escape(plan.data)}")
    for note in plan.notes:
        _say(f"[yellow]note:[/] {escape(note)}")
    if t.peak_bytes is not None:
        _say(f"memory: about {_gib(t.peak_bytes)} at the peak of a step, of {_gib(t.budget_bytes)} available "
             f"({escape(t.how)})")
    if t.seconds is not None and plan.total_seconds is not None:
        grids = f"{plan.grids} {'grid' if plan.grids == 1 else 'grids'}"
        _say(f"time: {t.seconds:.3g} s per step ({escape(t.how)}): {plan.steps:,} steps take about "
             f"{duration(plan.steps * t.seconds)}, {grids} about {duration(plan.grids * (plan.grid_seconds or 0))}; "
             f"about {duration(plan.total_seconds)} in all (data loading not counted)")
    else:
        _say("time: no training step finished, so no estimate")
    files = ", ".join(RUN_FILES)
    _say(f"writes: {_folder(plan.run_dir, plan.run_dir_exists)}: {files} (checkpoints about "
         f"{plan.checkpoint_bytes / 2**20:,.0f} MiB each)")
    _say(f"        {_folder(plan.generated_dir, plan.generated_dir_exists)}: {GRID_FILES}")
    _say(f"measured in {plan.seconds:.0f} s; start it with the same command without --dry-run")


def render_resume(plan: ResumePlan) -> None:
    """What a resume would restore and change."""
    _say("[bold]ddpmctl resume --dry-run[/]: nothing was written and the run's lock was not taken; resume would:")
    if plan.checkpoint is None:
        _say(f"start {escape(plan.run_dir)} over at step 0 of {plan.total_steps:,}")
    else:
        loss = f", loss {plan.loss:.4f}" if plan.loss is not None else ""
        _say(f"restore: {escape(plan.checkpoint)} (step {plan.step:,} of {plan.total_steps:,}{loss}): weights, EMA, "
             "optimizer, LR schedule, random state")
        _say(f"data: continue {escape(plan.data)}")
        _say("changes from the checkpoint's config: " + (escape("; ".join(plan.changes)) if plan.changes else "none"))
        if plan.set_aside:
            _say(f"set aside (not deleted): {escape(', '.join(plan.set_aside))}")
    for note in plan.notes:
        _say(f"[yellow]note:[/] {escape(note)}")


def show_plan(cfg: config_mod.Config) -> None:
    """Plan the run of ``cfg`` (a resume when it names a checkpoint), show it, write nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--dry-run measures in one process: run it without torchrun")
    if cfg.training.resume_from_checkpoint:
        render_resume(plan_resume(cfg))
        return
    render_train(plan_train(cfg, on_progress=lambda m: err_console.print(f"dry run: {m}", highlight=False)))
