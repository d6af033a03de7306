"""``ddpmctl prepare``: turn a folder of images into a verified N x N training set (and optionally a packed array)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ..host import cpu_cores
from ..images import CROPS, parse_color
from ..prepare import SMALL_POLICIES, prepare
from .common import console, handle_errors, interrupted, plural

PHASES = {"scan": "scanning", "convert": "converting", "pack": "packing"}
SHOWN = 10  # skipped files named on screen; all of them are in report.txt


@handle_errors
def prepare_cmd(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="folder of images (searched recursively)", show_default=False)],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="output folder (created; rerun to update it)", show_default=False)],
    size: Annotated[int, typer.Option("--size", min=1, help="side of the square output images, in pixels")],
    crop: Annotated[str, typer.Option("--crop", help="center: fill the square, cut the overflow; pad: keep the "
                                      "whole image and pad the sides")] = "center",
    small: Annotated[str, typer.Option("--small", help="images smaller than --size: upscale them, or skip them")] = "upscale",
    background: Annotated[str, typer.Option("--background", help="colour behind transparent pixels and of the "
                                            "padding: a name, #rrggbb or r,g,b")] = "white",
    pack: Annotated[Optional[bool], typer.Option("--pack/--no-pack", help="also write packed.npy, one uint8 array "
                                                 "that training memory-maps (no decoding); --no-pack deletes it; "
                                                 "default: keep an existing one up to date", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="worker processes (default: all cores)",
                                                   show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="DST was prepared from another SRC: replace its images with "
                                        "those of SRC (outputs of sources not in SRC are deleted)")] = False,
    classes: Annotated[str, typer.Option("--classes", help="auto: SRC's subfolders are classes when every image sits "
                                         "in one of two or more (class-conditional training); none: no classes")] = "auto",
) -> None:
    """Check, convert and resize every image under SRC into an N x N RGB training set in DST."""
    if crop not in CROPS:
        raise typer.BadParameter(f"must be one of {', '.join(CROPS)}", param_hint="--crop")
    if small not in SMALL_POLICIES:
        raise typer.BadParameter(f"must be one of {', '.join(SMALL_POLICIES)}", param_hint="--small")
    if classes not in ("auto", "none"):
        raise typer.BadParameter("must be auto or none", param_hint="--classes")
    color = parse_color(background)
    workers = workers or cpu_cores()
    # Not on a terminal the bar shows nothing (it is transient), yet rich would end it with a blank line on stdout.
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_interactive) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(PHASES.get(phase, phase), total=total or None)
            progress.update(tasks[phase], completed=done, total=total or None)

        try:
            result = prepare(src, dst, size, crop=crop, small=small, background=color, workers=workers, pack=pack,
                             force=force, classes=classes, on_progress=on_progress)
        except KeyboardInterrupt:
            progress.stop()
            raise interrupted("interrupted: the images converted so far are kept; run the same command again to "
                              "continue") from None

    rate = (f" ({result.converted / result.seconds:.0f}/s on {workers} {plural(workers, 'process', 'processes')})"
            if result.converted else "")
    console.print(f"[bold]{result.count}[/] {plural(result.count, 'image')} of {size}x{size} in {result.dst}: "
                  f"{result.converted} converted{rate}, {result.unchanged} unchanged, {result.removed} removed",
                  highlight=False)
    if result.classes:
        console.print(f"{result.classes} (one per folder of SRC; --classes none to train without them)",
                      highlight=False, soft_wrap=True)
    if result.small:
        n = len(result.small)
        what = (f"{plural(n, 'was', 'were')} upscaled ({plural(n, 'it', 'they')} may look soft)"
                if result.settings.small == "upscale" else f"{plural(n, 'was', 'were')} skipped (--small skip)")
        console.print(f"[yellow]{n} {plural(n, 'image')} smaller than {size}px {what}[/]", highlight=False)
    if result.rejected:
        console.print(f"[yellow]{len(result.rejected)} {plural(len(result.rejected), 'file')} skipped:[/]", highlight=False)
        for rel, reason in result.rejected[:SHOWN]:
            console.print(f"  {rel}: {reason}", highlight=False, soft_wrap=True)
        if len(result.rejected) > SHOWN:
            console.print(f"  ... and {len(result.rejected) - SHOWN} more", highlight=False)
    if result.pack is not None:
        console.print(f"packed array: {result.pack}" + ("" if result.pack_written else " (up to date)"), highlight=False)
    console.print(f"report: {result.report}", highlight=False)
    console.print(f"train on it with: ddpmctl train --path-to-data {result.dst} --img-size {size}", highlight=False)
