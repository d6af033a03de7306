"""``ddpmctl checkpoints list|prune|export``: look at a run's checkpoints, thin them out, export weights
(one safetensors file, or a diffusers folder)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .. import checkpoints as ck
from .. import pretrained, prune, rundir, runlock
from ..export import export_weights
from ..layout import ABANDONED
from .common import console, err_console, fail, handle_errors

app = typer.Typer(
    name="checkpoints",
    help="List, prune and export a run's checkpoints.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

RunDirArg = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder (WORKING_DIRECTORY/EXPERIMENT_NAME)",
                                           show_default=False)]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _when(info: ck.CheckpointInfo) -> str:
    stamp = info.saved_at
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _list_table(found: list[ck.CheckpointInfo]) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name, justify in (("checkpoint", "left"), ("step", "right"), ("saved", "left"), ("size", "right"),
                          ("EMA", "left"), ("loss", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("status", overflow="fold")  # a narrow terminal wraps the reason instead of cutting file names
    for info in found:
        loss = f"{info.loss:.4f}" if info.loss is not None else "-"
        ema = ("yes" if info.has_ema else "no") if info.complete else "-"
        table.add_row(info.name, str(info.step) if info.step >= 0 else "?", _when(info),
                      human_size(info.size_bytes), ema, loss, "ok" if info.complete else info.problem)
    return table


def _plan_table(plan: prune.PrunePlan) -> Table:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for name, justify in (("checkpoint", "left"), ("step", "right"), ("size", "right"), ("action", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("why")
    rows = [(info, "keep", why) for info, why in plan.keep] + [(info, "delete", why) for info, why in plan.remove]
    for info, action, why in sorted(rows, key=lambda r: (r[0].step, r[0].name)):
        style = "red" if action == "delete" else "green"
        table.add_row(info.name, str(info.step) if info.step >= 0 else "?", human_size(info.size_bytes),
                      f"[{style}]{action}[/]", why)
    return table


@app.command("list")
@handle_errors
def list_cmd(run_dir: RunDirArg) -> None:
    """Show a run's checkpoints: step, time, size, EMA or not, loss at save; damaged ones say why."""
    prune.check_run_dir(run_dir)
    found = rundir.list_checkpoints(run_dir, verify_hashes=True)  # "ok" and "resume uses" must mean what resume finds
    if not found:
        console.print(f"{run_dir} holds no checkpoint", highlight=False, soft_wrap=True)
        return
    console.print(_list_table(found), soft_wrap=True)
    good = [c for c in found if c.complete]
    total = sum(c.size_bytes for c in found)
    newest = f"; resume uses {good[-1].name}" if good else "; none is usable"
    console.print(f"{len(found)} checkpoint(s), {human_size(total)}{newest}", highlight=False)
    aside = run_dir / ABANDONED
    if aside.is_dir() and any(aside.iterdir()):
        console.print(f"{aside} holds the checkpoints a resume from an older step set aside (not listed above)",
                      highlight=False, soft_wrap=True)


def _stdin_is_terminal() -> bool:
    """Whether a confirmation question can be answered (not when stdin is a pipe or /dev/null)."""
    return sys.stdin is not None and sys.stdin.isatty()


@app.command("prune")
@handle_errors
def prune_cmd(
    run_dir: RunDirArg,
    keep: Annotated[int, typer.Option("--keep", help="how many of the newest complete checkpoints to keep "
                                      "(at least 1)", show_default=False)],
    keep_every: Annotated[Optional[int], typer.Option("--keep-every", metavar="K", help="also keep every checkpoint "
                                                      "whose step is a multiple of K (milestones)",
                                                      show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what would be deleted")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="delete without asking")] = False,
) -> None:
    """Delete old checkpoints: shows the plan first, then asks (or --yes, needed without a terminal); never deletes the newest."""
    plan = prune.plan_prune(run_dir, keep, keep_every)
    if not plan.keep and not plan.remove:
        console.print(f"{run_dir} holds no checkpoint", highlight=False, soft_wrap=True)
        return
    console.print(_plan_table(plan), soft_wrap=True)
    if not plan.remove:
        console.print("nothing to delete", highlight=False)
        return
    summary = f"{len(plan.remove)} checkpoint(s) to delete, {human_size(plan.freed_bytes)} freed; {len(plan.keep)} kept"
    console.print(summary, highlight=False)
    if dry_run:
        console.print("dry run: nothing deleted", highlight=False)
        return
    if runlock.is_training(run_dir):  # before asking (read-only); execute_prune holds the lock while it deletes
        raise runlock.in_use_error(run_dir)
    if not yes and not _stdin_is_terminal():  # a script or cron job: there is nobody to ask
        raise fail("nothing deleted: stdin is not a terminal, so there is nobody to confirm; pass --yes to delete "
                   "without asking (or --dry-run to only look)")
    if not yes:
        if not typer.confirm("Delete them?", default=False, err=True):
            err_console.print("nothing deleted", highlight=False)
            raise typer.Exit(1)
    removed = prune.execute_prune(plan)
    console.print(f"deleted {len(removed)} checkpoint(s): {', '.join(p.name for p in removed) or 'none'}",
                  highlight=False)


@app.command("export")
@handle_errors
def export_cmd(
    source: Annotated[Path, typer.Argument(metavar="RUN_DIR_OR_CHECKPOINT", help="a checkpoint folder, or a run "
                                           "folder (its newest good checkpoint)", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="FILE.safetensors|DIR", help="the file to write "
                                      "(safetensors), or the folder (diffusers)", show_default=False)],
    format: Annotated[str, typer.Option("--format", metavar="[safetensors|diffusers]", help="safetensors: one file, "
                                        "model config in its metadata; diffusers: a folder that diffusers' "
                                        "UNet2DModel/DDPMPipeline.from_pretrained load, with a model card")] = "safetensors",
    force: Annotated[bool, typer.Option("--force", help="overwrite --out if it exists (diffusers: an earlier "
                                        "export only)")] = False,
) -> None:
    """Write the (EMA) weights as one .safetensors file, or as a diffusers folder (--format diffusers)."""
    if format not in ("safetensors", "diffusers"):
        raise typer.BadParameter("must be safetensors or diffusers", param_hint="--format")
    if format == "diffusers":
        folder = pretrained.export_diffusers(source, out, overwrite=force)
        for note in folder.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(f"wrote {folder.out} ({folder.weights} weights of {folder.source.name}, step {folder.step}): "
                      "a DDPMPipeline folder with unet/, scheduler/ and a model card (README.md)", highlight=False,
                      soft_wrap=True)
        return
    result = export_weights(source, out, overwrite=force)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(
        f"wrote {result.out} ({result.weights} weights of {result.source.name}, step {result.step}, "
        f"{result.tensors} tensors, {human_size(result.size_bytes)}); model config in its metadata "
        "under 'model_config'", highlight=False,
    )
