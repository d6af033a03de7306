"""``python -m ddpmctl.cli.demo`` (what ``make demo`` runs): build the demo data, train on it, sample a grid.

A rerun continues the existing demo run (finished runs finish at once) and samples again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .. import config as config_mod
from ..demo_data import make_demo_dataset
from ..inference import generate, load_model
from ..layout import RUN_CONFIG
from ..sampling import SAMPLER_NAMES, recommended_sampler
from .common import console, handle_errors
from .train import run_training

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


@handle_errors
def demo(
    data: Annotated[Path, typer.Option(help="where to write the demo images")] = Path("data/demo"),
    work: Annotated[str, typer.Option(help="working directory for the run")] = "runs/working",
    generated: Annotated[str, typer.Option(help="directory for progression grids")] = "runs/generated",
    out: Annotated[Path, typer.Option(help="where to write the final samples")] = Path("runs/samples/demo"),
    config: Annotated[Path, typer.Option(help="demo recipe")] = DEFAULT_CONFIG,
    num_images: Annotated[int, typer.Option(help="demo images to draw")] = 4000,
) -> None:
    """Train the demo model on procedurally drawn shapes and write a grid of samples."""
    started = time.perf_counter()
    overrides = {"path_to_data": str(data), "working_directory": work, "generated_directory": generated}
    cfg = config_mod.resolve(config, overrides)
    console.print(f"[bold]1/3[/] drawing {num_images} demo images into {data}", highlight=False)
    make_demo_dataset(data, num_images=num_images, size=cfg.model.img_size, seed=cfg.run.seed)
    if (cfg.run_dir / RUN_CONFIG).is_file():
        console.print(f"[bold]2/3[/] continuing the existing demo run in {cfg.run_dir}", highlight=False)
        cfg = config_mod.resolve_for_resume(config, overrides)
    else:
        console.print(f"[bold]2/3[/] training in {cfg.run_dir}", highlight=False)
    run_training(cfg)
    loaded = load_model(cfg.run_dir, device=cfg.run.device, precision=cfg.training.precision)
    sampler, steps = recommended_sampler(loaded.config.diffusion)
    console.print(f"[bold]3/3[/] sampling 64 images with {SAMPLER_NAMES[sampler]}-{steps} (EMA weights) into {out}",
                  highlight=False)
    sheet = generate(loaded, out, 64, sampler=sampler, steps=steps, seed=0, grid=True, contact_sheet=True,
                     force=True).sheet
    console.print(f"[green]demo done[/] in {time.perf_counter() - started:.0f} s", highlight=False)
    console.print(f"  samples grid:     {sheet}", highlight=False)
    console.print(f"  denoising grid:   {out / 'progression.png'}", highlight=False)
    console.print(f"  training grids:   {cfg.generated_dir}/step_<N>.png", highlight=False)
    console.print(f"  loss curve:       {cfg.run_dir / 'loss.png'}", highlight=False)


def main() -> None:
    typer.run(demo)


if __name__ == "__main__":
    main()
