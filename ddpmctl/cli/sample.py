"""``ddpmctl sample``: generate images from a checkpoint (or a run folder's latest checkpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..classes import class_index
from ..errors import ConfigError
from ..inference import LoadedModel, SampleProgress, earlier_outputs, generate, load_model
from ..sampling import DEFAULT_GUIDANCE, SAMPLERS, recommended_sampler
from .common import console, handle_errors, plural
from .options import DeviceOpt, MaybeSamplerOpt, PrecisionOpt, plain_help

# Options shared with `ddpmctl evaluate`.
CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")]
StepsOpt = Annotated[Optional[int], typer.Option(
    "--steps", min=1, help=plain_help("denoising steps for ddim/dpmpp2m/heun (heun calls the network twice per step) "
                                      "[default: with the default sampler, its measured step count; else 50]"))]
EtaOpt = Annotated[float, typer.Option("--eta", min=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")]
SeedOpt = Annotated[int, typer.Option("--seed", help="the same seed gives the same images on the same device")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="images denoised at once (halved if memory runs out)")]
NoEmaOpt = Annotated[bool, typer.Option("--no-ema", help="use the raw weights instead of the EMA weights")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the network (CUDA: CUDA graphs, mode reduce-overhead): the first batch waits "
                      "for the compilation (a minute or more), later batches run faster on CUDA GPUs "
                      "(docs/performance.md); on the CPU it works too, but compiling is slow there and pays off "
                      "only for long runs")]

ClassOpt = Annotated[Optional[str], typer.Option(
    "--class", metavar="NAME|INDEX", help=plain_help("class-conditional models: the class to draw [default: every "
                                                     "class in turn]"), show_default=False)]
GuidanceOpt = Annotated[Optional[float], typer.Option(
    "--guidance-scale", min=0.0, metavar="W", help=plain_help(
        f"class-conditional models: classifier-free guidance, (1 + W) eps(x, class) - W eps(x); 0 turns it off "
        f"[default: {DEFAULT_GUIDANCE:g}, measured in docs/classes.md]"), show_default=False)]
CudaGraphOpt = Annotated[bool, typer.Option(
    "--cuda-graph/--no-cuda-graph", help="CUDA: replay each deterministic DDIM (--eta 0) or DPM-Solver++ loop as one "
                                         "captured CUDA graph")]


@handle_errors
def sample_cmd(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG files (refused if it holds earlier samples)")],
    num: Annotated[int, typer.Option("--num", min=1, help="number of images")] = 16,
    grid: Annotated[bool, typer.Option(
        "--grid", help="also write progression.png (noise to image, a row for each of the first 8 samples) and "
                   "samples.png (all, up to 256, tiled)")] = False,
    show_x0: Annotated[bool, typer.Option("--show-x0", help="with --grid: add a row of predicted x_0 under each sample")] = False,
    plot_freq_interval: Annotated[Optional[int], typer.Option(
        "--plot-freq-interval", min=1, help=plain_help("with --grid: timesteps between columns [default: the run's]"))] = None,
    sampler: MaybeSamplerOpt = None,
    steps: StepsOpt = None,
    eta: EtaOpt = 0.0,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 64,
    no_ema: NoEmaOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    cuda_graph: CudaGraphOpt = True,
    class_: ClassOpt = None,
    guidance_scale: GuidanceOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="replace the sample_*.png, samples.png and progression.png already in --out "
                        "(they are deleted before sampling)")] = False,
) -> None:
    """Generate --num images as PNG files in --out.

    Without --sampler, the sampler and step count that measured best for the model's objective are used
    (docs/quality.md): Heun for edm models, DPM-Solver++(2M) for ddpm ones.
    """
    steps = check_sampler_options(sampler, steps, precision)
    earlier_outputs(out, force)  # refuse a file, or earlier samples without --force, before loading anything
    loaded = load_model(checkpoint, device=device, use_ema=not no_ema, precision=precision, compile=compile,
                        cuda_graph=cuda_graph)
    for note in loaded.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    index = check_class_options(loaded, class_, guidance_scale)
    sampler, steps = default_sampler(loaded, sampler, steps)
    steps = check_steps(steps, loaded, sampler)
    console.print(f"sampling {num} {plural(num, 'image')} from {loaded.checkpoint} (step {loaded.step}, "
                  f"{describe(loaded, sampler, steps, eta, index, guidance_scale)}) on {loaded.device}, batches of "
                  f"{min(batch_size, num)}", highlight=False)
    with sampling_progress() as on_progress:
        res = generate(loaded, out, num, sampler=sampler, steps=steps, eta=eta, seed=seed, batch_size=batch_size,
                       grid=grid, contact_sheet=grid, show_x0=show_x0, plot_freq_interval=plot_freq_interval,
                       force=force, on_progress=on_progress, class_index=index, guidance=guidance_scale)
    replaced = f" (replacing {res.replaced} earlier files)" if res.replaced else ""
    console.print(f"wrote {num} {plural(num, 'image')} to {out}{replaced}", highlight=False)
    if res.grid is not None:
        console.print(f"progression grid: {res.grid}", highlight=False)
    if res.sheet is not None:
        console.print(f"all samples in one picture: {res.sheet}", highlight=False)


def check_sampler_options(sampler: str | None, steps: int | None, precision: str) -> int | None:
    """Validate --sampler/--precision before anything is loaded (None: the model's recommended sampler)."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be ddpm, ddim, dpmpp2m or heun, not {sampler!r}")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if sampler == "ddpm" and steps is not None:
        raise ConfigError("--steps applies to --sampler ddim, dpmpp2m or heun; ddpm always runs every timestep of the model")
    return steps


def default_sampler(loaded: LoadedModel, sampler: str | None, steps: int | None) -> tuple[str, int | None]:
    """The sampler asked for, or the one that measured best for the model's objective (with its step count)."""
    if sampler is not None:
        return sampler, steps
    best, best_steps = recommended_sampler(loaded.config.diffusion)
    return best, steps if steps is not None else min(best_steps, loaded.schedule.num_steps)


def check_steps(steps: int | None, loaded: LoadedModel, sampler: str = "ddim") -> int | None:
    """--steps against the model's T; ddim/dpmpp2m/heun default to 50 steps (or T when T is smaller)."""
    total = loaded.schedule.num_steps
    if steps is not None and steps > total:
        raise ConfigError(f"--steps must be at most {total} for this model")
    if sampler != "ddpm" and steps is None:
        return min(50, total)
    return steps


def check_class_options(loaded: LoadedModel, name: str | None, guidance: float | None) -> int | None:
    """The class index --class names (None: every class in turn), or a ConfigError for a model without classes."""
    if not loaded.config.model.class_names and (name is not None or guidance is not None):
        given = "--class" if name is not None else "--guidance-scale"
        raise ConfigError(f"{given} needs a class-conditional model; {loaded.checkpoint} was trained without classes "
                          "(train on a folder of class folders to get one)")
    return None if name is None else class_index(loaded.config.model.class_names, name)


def describe(loaded: LoadedModel, sampler: str, steps: int | None, eta: float, index: int | None = None,
             guidance: float | None = None) -> str:
    weights = "EMA" if loaded.ema else "raw"
    names = loaded.config.model.class_names
    if names:
        which = f"class {names[index]}" if index is not None else f"all {len(names)} classes"
        weights = f"{which}, guidance {DEFAULT_GUIDANCE if guidance is None else guidance:g}, {weights}"
    d = loaded.config.diffusion
    if sampler == "ddpm":
        what = f"DDPM, all {loaded.schedule.num_steps} steps"
    else:
        what = f"{sampler}, {steps} {plural(steps, 'step')}" + (f", eta {eta:g}" if sampler == "ddim" else "")
    if d.formulation == "edm":
        return f"{weights} weights, {what}, EDM formulation"
    return f"{weights} weights, {what}, {d.beta_schedule} schedule, {d.prediction_type} prediction"


@contextlib.contextmanager
def sampling_progress(label: str = "denoising", out: Console | None = None) -> Iterator[Callable[[SampleProgress], None]]:
    """A rich progress bar fed by :class:`SampleProgress` updates (notes are printed above it)."""
    with Progress(TextColumn(label), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[images]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=out or console) as progress:
        task = progress.add_task(label, total=None, images="")

        def on_progress(p: SampleProgress) -> None:
            if p.note:
                progress.console.print(f"[yellow]note:[/] {p.note}", highlight=False)
            progress.update(task, completed=p.units_done, total=p.units_total,
                            images=f"{p.images_done}/{p.images_total} images")

        yield on_progress
