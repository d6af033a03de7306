"""``ddpmctl evaluate``: sample N images from a checkpoint and report FID and KID against a folder."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..evaluate import EvaluationError, default_inception_path, evaluate
from ..inference import SampleProgress, load_model
from .common import console, err_console, handle_errors
from .options import DeviceOpt, PrecisionOpt, SamplerOpt, plain_help
from .sample import (
    BatchSizeOpt,
    CheckpointOpt,
    ClassOpt,
    CompileOpt,
    CudaGraphOpt,
    EtaOpt,
    GuidanceOpt,
    NoEmaOpt,
    SeedOpt,
    StepsOpt,
    check_class_options,
    check_sampler_options,
    check_steps,
    describe,
    sampling_progress,
)


@handle_errors
def evaluate_cmd(
    checkpoint: CheckpointOpt,
    data: Annotated[Path, typer.Option("--data", help="folder of reference images (e.g. the training set)")],
    num: Annotated[int, typer.Option("--num", min=2, help="images to generate (FID is usually reported at 50000)")] = 10000,
    sampler: SamplerOpt = "ddim",
    steps: StepsOpt = None,
    eta: EtaOpt = 0.0,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 64,
    no_ema: NoEmaOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object (for scripts) instead of a summary")] = False,
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception-weights", help="the Inception weights file, when it cannot be downloaded")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", help=plain_help("where reference features are cached "
                                       "[default: ~/.cache/ddpmctl/reference-features]"))] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    cuda_graph: CudaGraphOpt = True,
    class_: ClassOpt = None,
    guidance_scale: GuidanceOpt = None,
) -> None:
    """Generate --num images and report FID and KID against the images in --data.

    A class-conditional model draws its classes in proportion to --data's class folders; --class NAME with
    --data DIR/NAME scores one class.
    """
    steps = check_sampler_options(sampler, steps, precision)
    if not data.is_dir():
        raise EvaluationError(f"--data {data} is not a folder of images")
    loaded = load_model(checkpoint, device=device, use_ema=not no_ema, precision=precision, compile=compile,
                        cuda_graph=cuda_graph)
    steps = check_steps(steps, loaded, sampler)
    index = check_class_options(loaded, class_, guidance_scale)
    show = console if not json_out else err_console  # keep stdout clean for --json
    for note in loaded.notes:
        show.print(f"[yellow]note:[/] {note}", highlight=False)
    if inception_weights is None and not default_inception_path().is_file():
        show.print(f"downloading the Inception weights (first use, about 92 MB) into {default_inception_path()}",
                   highlight=False)
    show.print(f"evaluating {loaded.checkpoint} (step {loaded.step}, "
               f"{describe(loaded, sampler, steps, eta, index, guidance_scale)}): "
               f"{num} samples against {data}", highlight=False)
    with contextlib.ExitStack() as stack:
        # disable: not on a terminal the transient bar shows nothing, yet rich would end it with a blank line.
        ref_bar = stack.enter_context(Progress(TextColumn("reference features"), BarColumn(), MofNCompleteColumn(),
                                               TimeRemainingColumn(), console=show, transient=True,
                                               disable=not show.is_interactive))
        ref_task = ref_bar.add_task("reference", total=None)
        sample_bar: list[Callable[[SampleProgress], None]] = []

        def on_reference(done: int, total: int) -> None:
            ref_bar.update(ref_task, completed=done, total=total)

        def on_sample(p: SampleProgress) -> None:
            if not sample_bar:  # the reference features are done (or came from the cache)
                ref_bar.stop()
                sample_bar.append(stack.enter_context(sampling_progress("sampling", show)))
            sample_bar[0](p)

        result = evaluate(loaded, data, num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                          batch_size=batch_size, inception_weights=inception_weights, cache_dir=cache_dir,
                          on_reference=on_reference, on_sample=on_sample,
                          labels=None if index is None else [index] * num, guidance=guidance_scale)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    ref = "cached" if result.reference_cached else "computed now, cached"
    console.print(f"FID  {result.fid:.3f}   ({result.num_generated} generated vs {result.num_reference} reference images)",
                  highlight=False)
    console.print(f"KID  {result.kid_mean:.5f} ± {result.kid_std:.5f}   (subsets of {result.kid_subset_size})",
                  highlight=False)
    console.print(f"reference features: {ref} in {result.reference_cache}; {result.seconds:.0f} s in all", highlight=False)
