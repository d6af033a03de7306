"""``ddpmctl doctor``: show what this machine has and which batch size and width will fit (``--json`` for scripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .. import config as config_mod
from ..doctor import DEFAULT_CHANNELS, DEFAULT_IMG_SIZES, DoctorReport, run_doctor
from ..doctor_report import HoursPlan
from .common import console, err_console, handle_errors
from .options import MaybeDeviceOpt, MaybePrecisionOpt, plain_help

STATUS_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "info": "info"}


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**30:.1f} GiB"


LONG_RUN_SECONDS = 2 * 24 * 3600  # a recommended run longer than this gets a pointer to --hours


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def _batch(value: int | None) -> str:
    return "?" if value is None else ("does not fit" if value == 0 else str(value))


def table_axes(cfg: config_mod.Config, img_size: int | None, channels: int | None, config_file: Path | None,
               hours: float | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Rows and columns of the table: the defaults, or only what was asked for; with --hours, every size from
    32 px up to the asked one and widths from 32 channels, the candidates of the plan."""
    if hours:
        top = cfg.model.img_size
        sizes = tuple(sorted({s for s in (32, *DEFAULT_IMG_SIZES) if s <= top} | {top}))
        return sizes, tuple(sorted({32, *DEFAULT_CHANNELS, cfg.model.starting_channels}))
    sizes = (cfg.model.img_size,) if img_size or config_file else DEFAULT_IMG_SIZES
    widths = (cfg.model.starting_channels,) if channels else tuple(sorted({*DEFAULT_CHANNELS, cfg.model.starting_channels}))
    return sizes, widths


def render_hours_plan(plan: HoursPlan) -> None:
    checkpointing = ", with --gradient-checkpointing" if plan.gradient_checkpointing else ""
    console.print(f"[bold]best pictures in {plan.hours:g} h:[/] {plan.img_size}px / {plan.starting_channels} channels, "
                  f"batch {plan.batch_size} x {plan.gradient_accumulation_steps}{checkpointing}, "
                  f"{plan.num_training_steps:,} steps ({plan.images:,} images at {plan.images_per_sec:,.1f} img/s): "
                  f"{plan.why}", highlight=False)
    console.print(f"  {plan.command}", highlight=False, soft_wrap=True)


def render(report: DoctorReport) -> None:
    env, probe, rec = report.environment, report.probe, report.recommendation
    console.print(f"[bold]ddpmctl doctor[/] ({report.mode} mode, {report.seconds:.0f} s)", highlight=False)
    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_row("system", f"{env.os} ({env.machine}), Python {env.python}")
    info.add_row("versions", f"torch {env.torch} (CUDA build {env.torch_cuda_build or 'none'}), ddpmctl {env.ddpmctl}")
    info.add_row("CPU", f"{env.cpu_cores} cores, {env.torch_threads} torch threads, RAM {_gib(env.ram_available_bytes)} "
                        f"available of {_gib(env.ram_total_bytes)}")
    cuda = env.cuda
    if cuda.get("name"):
        info.add_row("CUDA", f"{cuda['name']} (compute {cuda['capability']}), {_gib(cuda['free_bytes'])} free of "
                             f"{_gib(cuda['total_bytes'])}, bf16 {'yes' if cuda['bf16'] else 'no'}")
    else:
        info.add_row("CUDA", "available" if cuda["available"] else "not available")
    mps = env.mps
    mps_text = "available" if mps["available"] else "not available"
    if mps.get("recommended_max_bytes"):
        mps_text = f"recommended maximum {_gib(mps['recommended_max_bytes'])}"
    if mps.get("chip") or mps.get("macos"):
        mps_text += f" on {mps.get('chip') or 'an unknown chip'}, macOS {mps.get('macos') or '?'}"
    info.add_row("MPS", f"{mps_text}; PYTORCH_MPS_HIGH_WATERMARK_RATIO {mps['high_watermark_ratio']}")
    info.add_row("torch.compile", f"{env.torch_compile['status']}: {env.torch_compile['detail']}")
    dl = env.dataloader
    info.add_row("DataLoader", f"--num-workers {dl['num_workers']}, pin_memory {'on' if dl['pin_memory'] else 'off'}, "
                               f"persistent workers {'on' if dl['persistent_workers'] else 'off'}")
    console.print(info)

    checks = Table(title="checks", title_justify="left")
    for col in ("check", "status", "detail", "fix"):
        checks.add_column(col)
    for c in env.checks:
        checks.add_row(c.name, STATUS_STYLE.get(c.status, c.status), c.detail, c.fix or "")
    console.print(checks)

    if probe is not None:
        points = Table(title=f"probe: {probe.img_size}px, {probe.starting_channels} channels, "
                             f"{probe.parameters / 1e6:.1f}M parameters on {probe.device} ({probe.precision})",
                       title_justify="left")
        for col in ("phase", "batch", "peak memory", "s/step", "img/s"):
            points.add_column(col, justify="right" if col != "phase" else "left")
        for p in probe.points:
            peak = "out of memory" if p.oom else _gib(p.peak_bytes)
            points.add_row(p.phase, str(p.batch), peak, f"{p.seconds:.2f}" if p.seconds else "-",
                           f"{p.images_per_sec:,.1f}" if p.images_per_sec else "-")
        console.print(points)
        if probe.fit:
            console.print(f"fit: peak = {_gib(probe.fit.intercept)} + {probe.fit.slope / 2**20:,.1f} MiB x batch "
                          f"({probe.fit.source}); budget {_gib(probe.budget_bytes)}, headroom {probe.headroom:.0%}",
                          highlight=False)
        console.print(f"largest batch that fits: [bold]{probe.max_batch if probe.max_batch is not None else '?'}[/]"
                      + (f"; bisected real largest batch: {probe.largest_batch_bisected}"
                         if probe.largest_batch_bisected else "")
                      + f"; with --gradient-checkpointing: {_batch(probe.max_batch_checkpointing)}", highlight=False)

    grid = Table(title="what fits here: largest batch / images per second (* measured); in brackets, with "
                       "--gradient-checkpointing", title_justify="left")
    grid.add_column("image size")
    for ch in report.channels:
        grid.add_column(f"{ch} channels", justify="right")
    by_key = {(c.img_size, c.starting_channels): c for c in report.table}
    for size in report.img_sizes:
        row = [f"{size}x{size}"]
        for ch in report.channels:
            cell = by_key[(size, ch)]
            batch = _batch(cell.max_batch)
            speed = f"{cell.images_per_sec:,.1f} img/s" if cell.images_per_sec else "? img/s"
            ckpt = "" if cell.max_batch_checkpointing is None else f" ({_batch(cell.max_batch_checkpointing)} / " + (
                f"{cell.images_per_sec_checkpointing:,.1f})" if cell.images_per_sec_checkpointing else "?)")
            row.append(f"{batch} / {speed}{' *' if cell.measured else ''}{ckpt}")
        grid.add_row(*row)
    console.print(grid)

    if report.hours_plan is not None:
        render_hours_plan(report.hours_plan)
    if rec is not None:
        asked = "the model asked for" if report.hours_plan is not None else "recommended"
        console.print(f"{asked} (effective batch {rec.effective_batch}, about {_duration(rec.estimated_seconds)} "
                      f"for {rec.num_training_steps:,} steps at {rec.images_per_sec or 0:,.1f} img/s):", highlight=False)
        console.print(f"  {rec.command}", highlight=False, soft_wrap=True)
        if report.hours_plan is None and (rec.estimated_seconds or 0) >= LONG_RUN_SECONDS:
            console.print(f"[yellow]that is {_duration(rec.estimated_seconds)} here:[/] `ddpmctl doctor --hours H` "
                          "plans the size, width and steps that give the best pictures in the H hours you have",
                          highlight=False)
    ckpt_rec = report.recommendation_checkpointing
    if ckpt_rec is not None:
        console.print(f"with --gradient-checkpointing (effective batch {ckpt_rec.effective_batch} in "
                      f"{ckpt_rec.gradient_accumulation_steps} step(s), about {_duration(ckpt_rec.estimated_seconds)}):",
                      highlight=False)
        console.print(f"  {ckpt_rec.command}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@handle_errors
def doctor_cmd(
    img_size: Annotated[Optional[int], typer.Option(
        "--img-size", min=8, help=plain_help("image size to probe [default: 128]"))] = None,
    starting_channels: Annotated[Optional[int], typer.Option(
        "--starting-channels", min=1, help=plain_help("starting channels to probe [default: 128]"))] = None,
    config: Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="YAML training config to probe")] = None,
    num_training_steps: Annotated[Optional[int], typer.Option("--num-training-steps", min=1,
                                                              help="steps for the wall-time estimate")] = None,
    device: MaybeDeviceOpt = None,
    precision: MaybePrecisionOpt = None,
    headroom: Annotated[float, typer.Option("--headroom", help="fraction of memory kept free")] = 0.15,
    effective_batch: Annotated[int, typer.Option("--effective-batch", min=1,
                                                 help="images per optimizer step to recommend")] = 64,
    full: Annotated[bool, typer.Option("--full", help="measure every table cell, compile-check, bisect (slow)")] = False,
    hours: Annotated[Optional[float], typer.Option(
        "--hours", help="plan the image size, width, batch and steps that give the best pictures in this many "
                        "hours here (from the measured speeds and the quality benchmark's curve)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """Probe this machine's memory (CUDA, MPS or CPU) with real training steps and suggest batch size and width."""
    overrides: dict[str, Any] = {"img_size": img_size, "starting_channels": starting_channels,
                                 "num_training_steps": num_training_steps, "device": device, "precision": precision}
    cfg = config_mod.resolve(config, overrides)
    sizes, widths = table_axes(cfg, img_size, starting_channels, config, hours)

    def progress(message: str) -> None:
        if not as_json:
            err_console.print(f"[dim]{message}[/]", highlight=False)

    report = run_doctor(cfg, full=full, headroom=headroom, effective_batch=effective_batch, img_sizes=sizes,
                        channels=widths, config_file=str(config) if config else None, on_progress=progress,
                        hours=hours)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        render(report)
