"""``ddpmctl sample``: generate images from a checkpoint (or a run folder's latest checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import ConfigError
from ..inference import generate, load_model
from .common import console, handle_errors


@handle_errors
def sample_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG files")],
    num: Annotated[int, typer.Option("--num", min=1, help="number of images")] = 16,
    grid: Annotated[bool, typer.Option("--grid", help="also write progression.png (noise to image, a row per sample)")] = False,
    show_x0: Annotated[bool, typer.Option("--show-x0", help="with --grid: add a row of predicted x_0 under each sample")] = False,
    sampler: Annotated[str, typer.Option("--sampler", help="ddpm (all timesteps), ddim or dpmpp2m")] = "ddpm",
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="denoising steps for ddim/dpmpp2m [default: 50]")] = None,
    eta: Annotated[float, typer.Option("--eta", min=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="the same seed gives the same images on the same device")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images denoised at once")] = 64,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="use the raw weights instead of the EMA weights")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cuda, mps or cpu")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, bf16 or fp16")] = "auto",
) -> None:
    """Generate --num images as PNG files in --out."""
    if sampler not in ("ddpm", "ddim", "dpmpp2m"):
        raise ConfigError(f"--sampler must be ddpm, ddim or dpmpp2m, not {sampler!r}")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if sampler != "ddpm" and steps is None:
        steps = 50
    loaded = load_model(checkpoint, device=device, use_ema=not no_ema, precision=precision)
    for note in loaded.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if steps is not None and steps > loaded.schedule.num_steps:
        raise ConfigError(f"--steps must be at most {loaded.schedule.num_steps} for this model")
    weights = "EMA" if loaded.ema else "raw"
    what = "DDPM, all steps" if sampler == "ddpm" else f"{sampler}, {steps} steps"
    console.print(f"sampling {num} images from {loaded.checkpoint} (step {loaded.step}, {weights} weights, "
                  f"{what}) on {loaded.device}", highlight=False)
    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("denoising", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        written = generate(loaded, out, num, sampler=sampler, steps=steps, eta=eta, seed=seed, batch_size=batch_size,
                           grid=grid, show_x0=show_x0, on_progress=on_progress)
    console.print(f"wrote {num} images to {out}", highlight=False)
    if grid:
        console.print(f"progression grid: {written[-1]}", highlight=False)
