"""``ddpmctl evaluate``: sample N images from a checkpoint and report FID and KID against a folder, and with
``--memorization`` how near the samples come to the training images (nearest.png)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import EvaluationError
from ..evaluate import EvalResult, evaluate
from ..inception import default_inception_path
from ..inference import SampleProgress, load_model
from ..memorization import DEFAULT_QUANTILE, RATIO
from .common import console, err_console, handle_errors
from .options import DeviceOpt, MaybeSamplerOpt, PrecisionOpt, plain_help
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
    default_sampler,
    describe,
    sampling_progress,
)


@handle_errors
def evaluate_cmd(
    checkpoint: CheckpointOpt,
    data: Annotated[Path, typer.Option("--data", help="folder of reference images (e.g. the training set; with "
                                                      "--memorization the training set, raw or prepared)")],
    num: Annotated[int, typer.Option("--num", min=2, help="images to generate (FID is usually reported at 50000)")] = 10000,
    sampler: MaybeSamplerOpt = None,
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
    memorization: Annotated[bool, typer.Option(
        "--memorization", help="also find each sample's nearest training image (pixels and an offline descriptor, "
                               "mirror images included): the share of likely copies, and nearest.png (works offline)")] = False,
    no_fid: Annotated[bool, typer.Option("--no-fid", help="skip FID and KID (with --memorization)")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help=plain_help("with --memorization: folder for nearest.png and memorization.json "
                                 "[default: RUN/evaluate/step_N]"))] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    cuda_graph: CudaGraphOpt = True,
    class_: ClassOpt = None,
    guidance_scale: GuidanceOpt = None,
) -> None:
    """Generate --num images and report FID and KID against the images in --data (--memorization: likely copies).

    A class-conditional model draws its classes in proportion to --data's class folders; --class NAME with
    --data DIR/NAME scores one class.
    """
    steps = check_sampler_options(sampler, steps, precision)
    if no_fid and not memorization:
        raise EvaluationError("--no-fid leaves nothing to evaluate: add --memorization")
    if not data.is_dir():
        raise EvaluationError(f"--data {data} is not a folder of images")
    loaded = load_model(checkpoint, device=device, use_ema=not no_ema, precision=precision, compile=compile,
                        cuda_graph=cuda_graph)
    sampler, steps = default_sampler(loaded, sampler, steps)
    steps = check_steps(steps, loaded, sampler)
    index = check_class_options(loaded, class_, guidance_scale)
    show = console if not json_out else err_console  # keep stdout clean for --json
    for note in loaded.notes:
        show.print(f"[yellow]note:[/] {note}", highlight=False)
    if not no_fid and inception_weights is None and not default_inception_path().is_file():
        show.print(f"downloading the Inception weights (first use, about 92 MB) into {default_inception_path()}",
                   highlight=False)
    show.print(f"evaluating {loaded.checkpoint} (step {loaded.step}, "
               f"{describe(loaded, sampler, steps, eta, index, guidance_scale)}): "
               f"{num} samples against {data}", highlight=False)
    with contextlib.ExitStack() as stack:
        # disable: not on a terminal the transient bar shows nothing, yet rich would end it with a blank line.
        ref_bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                               TimeRemainingColumn(), console=show, transient=True,
                                               disable=not show.is_interactive))
        tasks: dict[str, int] = {}
        sample_bar: list[Callable[[SampleProgress], None]] = []

        def bar(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = ref_bar.add_task(name, total=total)
            ref_bar.update(tasks[name], completed=done, total=total)

        def on_reference(done: int, total: int) -> None:
            bar("reference features", done, total)

        def on_training(done: int, total: int) -> None:
            bar("training images", done, total)

        def on_sample(p: SampleProgress) -> None:
            if not sample_bar:  # the reference features are done (or came from the cache)
                ref_bar.stop()
                sample_bar.append(stack.enter_context(sampling_progress("sampling", show)))
            sample_bar[0](p)

        result = evaluate(loaded, data, num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                          batch_size=batch_size, inception_weights=inception_weights, cache_dir=cache_dir,
                          on_reference=on_reference, on_sample=on_sample, fid=not no_fid, memorization=memorization,
                          out_dir=out, on_training=on_training,
                          labels=None if index is None else [index] * num, guidance=guidance_scale)
    if json_out:
        if result.fid_skipped and result.fid_skipped != "--no-fid":
            err_console.print(f"FID/KID skipped: {result.fid_skipped}", highlight=False)
        typer.echo(json.dumps(result.to_dict()))
        return
    if result.fid is not None:
        ref = "cached" if result.reference_cached else "computed now, cached"
        console.print(f"FID  {result.fid:.3f}   ({result.num_generated} generated vs {result.num_reference} reference "
                      "images)", highlight=False)
        console.print(f"KID  {result.kid_mean:.5f} ± {result.kid_std:.5f}   (subsets of {result.kid_subset_size})",
                      highlight=False)
        console.print(f"reference features: {ref} in {result.reference_cache}", highlight=False)
    elif result.fid_skipped == "--no-fid":
        console.print("FID/KID skipped (--no-fid)", highlight=False)
    else:
        console.print(f"FID/KID skipped: {result.fid_skipped}", highlight=False, soft_wrap=True)
    if result.memorization is not None:
        show_memorization(result)
    console.print(f"{result.seconds:.0f} s in all", highlight=False)


def show_memorization(result: EvalResult) -> None:
    """The memorization report in a few lines (memorization.json in the report folder holds everything)."""
    m = result.memorization
    px, ft = m["pixel"], m["features"]
    near = 100 * (1 - DEFAULT_QUANTILE)
    console.print(f"memorization: {100 * m['copy_share']:.1f}% of {m['num_samples']} samples are likely copies (a model "
                  f"that copies nothing: about {100 * m['real_share']:.1f}%)", highlight=False, soft_wrap=True)
    if m["copying"]:
        console.print("  [yellow]the model copies training images:[/] see nearest.png; more images, an earlier "
                      "checkpoint or fewer training steps help", highlight=False, soft_wrap=True)
    console.print(f"  likely copy: nearer a training image (or its mirror image) than {near:.0f}% of the "
                  f"{m['num_training']} training images are to theirs, in pixels or features", highlight=False, soft_wrap=True)
    console.print(f"  pixels:   nearest training image at RMS {px['median']:.1f} of 255 (median; training images to "
                  f"theirs: {px['real_median']:.1f}), {100 * px['share']:.1f}% under the threshold {px['threshold']:.1f}",
                  highlight=False, soft_wrap=True)
    console.print(f"  features: nearest at {ft['median']:.3f} (training images: {ft['real_median']:.3f}), "
                  f"{100 * ft['share']:.1f}% under the threshold {ft['threshold']:.3f}", highlight=False, soft_wrap=True)
    console.print(f"  ratio test (nearest < {RATIO:.2f} x second nearest, Yoon et al. 2023): {100 * px['ratio_share']:.1f}% "
                  f"of samples in pixels, {100 * ft['ratio_share']:.1f}% in features (training images: "
                  f"{100 * px['real_ratio_share']:.1f}%, {100 * ft['real_ratio_share']:.1f}%)", highlight=False, soft_wrap=True)
    where = m["nearest_png"] or result.report_dir
    console.print(f"  nearest.png: the {len(m['closest'])} closest samples beside their training image, closest first "
                  f"(red frame: likely copy): {where}", highlight=False, soft_wrap=True)
