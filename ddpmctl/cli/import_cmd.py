"""``ddpmctl import``: turn a diffusers UNet2DModel folder of the DDPM family into a ddpmctl run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..pretrained import import_diffusers
from .common import console, handle_errors


@handle_errors
def import_cmd(
    source: Annotated[Path, typer.Argument(
        metavar="DIFFUSERS_DIR", help="a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model"
        ".safetensors, scheduler_config.json beside it) or a pipeline folder with unet/ and scheduler/",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="RUN_DIR", help="the run folder to write (new or empty)",
                                      show_default=False)],
) -> None:
    """Import a diffusers DDPM model as a ddpmctl run that sample, evaluate and train --init-from use."""
    result = import_diffusers(source, out)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    m, d = result.config.model, result.config.diffusion
    console.print(
        f"imported {source} into {result.run_dir} ({result.checkpoint.name}): {m.img_size} px, "
        f"{result.parameters / 1e6:.1f}M parameters, {d.beta_schedule} schedule over {d.num_diffusion_timesteps} "
        f"steps, predicts {d.prediction_type}", highlight=False, soft_wrap=True)
    console.print(f"sample with: ddpmctl sample --checkpoint {result.run_dir} --out samples", highlight=False,
                  soft_wrap=True)
