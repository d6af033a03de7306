"""``train --dry-run`` and ``resume --dry-run`` as data: what a run would do and cost, with nothing written.

:func:`plan_train` resolves what ``train`` would (data, device, precision, model size and FLOPs), times a
few real training steps with doctor's probe (:class:`~ddpmctl.doctor_child.Prober`: the step ``train``
runs, on random images) and scales them to the whole run. :func:`plan_resume` says which checkpoint,
step and data position a resume would restore and what differs from the saved configuration. Neither
takes the run's lock nor creates a file or folder (as EDM's ``train.py --dry-run``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import checkpoints, rundir
from .config import Config, absolute_path, complete_saved, flatten, to_dict, with_absolute_paths
from .cost import model_cost
from .data import build_dataset, upscale_note
from .doctor import ONE_POINT_SLOPE_PRIOR
from .doctor_child import Prober, load_backend
from .engine import loader_workers
from .errors import CheckpointError, ConfigError
from .estimate import evaluations, grid_note, grid_seconds
from .files import cannot_write
from .layout import ABANDONED, LOSS_PLOT, METRICS, RUN_CONFIG
from .memfit import fit_line
from .run_state import check_new_run, data_position, model_config_differs
from .runlock import is_training
from .runtime import resolve_precision, select_device
from .validation import check_attention_resolutions

MEASURE_BUDGET_S = 35.0  # seconds of training steps: the whole dry run stays under a minute on a 2-core CPU
MAX_TIMED_STEPS = 3  # timed steps per measurement, and measurements at the configured batch
MAX_POINTS = 8
GROW_MARGIN = 1.25  # a larger batch's step may take longer per image than batch 1's: keep to the budget
CHECKPOINT_BYTES_PER_PARAMETER = 16  # fp32 weights, EMA weights and AdamW's two moments
RUN_FILES = (RUN_CONFIG, "checkpoint_<step>/", METRICS, LOSS_PLOT)  # what the run folder gets (layout.py)
GRID_FILES = "step_<step>.png"
PATH_OPTIONS = ("working_directory", "generated_directory", "path_to_data")


@dataclass
class StepTiming:
    seconds: float | None  # one optimizer step at the configured batch x accumulation (None: none finished)
    precision: str  # what the steps ran in
    peak_bytes: float | None  # peak memory of a step at the configured batch
    budget_bytes: int  # what the device offers (CPU: available RAM plus this process)
    how: str  # how the figures were found (measured, or scaled from which batch)
    points: list[dict[str, Any]] = field(default_factory=list)  # doctor_child's measurements
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainPlan:
    config_yaml: str  # the resolved configuration, as config.yaml would hold it
    device: str
    precision: str
    parameters: int
    flops_per_image: float  # forward + backward
    data: str
    notes: list[str]
    images_per_step: int  # batch x accumulation
    timing: StepTiming
    steps: int  # optimizer steps the run would take
    grids: int
    grid_seconds: float | None
    total_seconds: float | None
    run_dir: str
    run_dir_exists: bool
    generated_dir: str
    generated_dir_exists: bool
    checkpoint_bytes: int  # about, per checkpoint
    seconds: float  # what the dry run took


def measure_steps(cfg: Config, activation_bytes: int, budget_s: float = MEASURE_BUDGET_S,
                  on_progress: Callable[[str], None] | None = None) -> StepTiming:
    """Time real training steps within ``budget_s``: batch 1 first (it warms up and gives a speed), then the largest
    batch up to the configured one whose steps fit the time left, again while time is left (the first step at a
    new shape carries one-time costs); the largest batch measured is scaled to the configured one (time and memory
    linear in the batch; ``activation_bytes`` per image is the memory slope when only one size was measured)."""
    say = on_progress or (lambda _m: None)
    deadline = time.perf_counter() + budget_s
    backend = load_backend(select_device(cfg.run.device).type)
    prober = Prober(cfg, backend)
    batch, spp = cfg.training.batch_size, backend.steps_per_point
    budget = backend.budget_bytes()
    points: list[dict[str, Any]] = []
    size, timed = 1, 1
    while size and len(points) < MAX_POINTS:
        say(f"timing {timed} training {'step' if timed == 1 else 'steps'} at batch {size}")
        point = prober.measure(size, "dry-run", timed_steps=timed)
        points.append(point)
        if point["oom"]:
            what = "not even batch 1" if size == 1 else f"batch {size}"
            return StepTiming(None, prober.precision.name, None, budget, f"batch {size} ran out of memory", points,
                              [f"{what} fits on this device: 'ddpmctl doctor' suggests a batch size and width "
                               "that do"])
        per_image, left = point["seconds"] / size, deadline - time.perf_counter()
        # Where measure() takes no warm-up step of its own (the CPU), a new shape is timed twice: its first step
        # pays for the memory it touches first (~1.6x a warm step at 128 px, batch 16; docs/performance.md).
        steps = spp - 1 + timed + (1 if spp == 1 else 0)
        grow = min(batch, int(left / (per_image * steps * GROW_MARGIN)))
        if grow >= 2 * size:
            size = grow
        elif left < point["seconds"] * spp or sum(p["batch"] == batch for p in points) >= MAX_TIMED_STEPS:
            size = 0
        timed = max(1, min(MAX_TIMED_STEPS, int(min(left, 2.0) / (per_image * max(size, 1)))))
    # The largest batch timed warm (twice: the first step at a shape carries its one-time costs), else the largest.
    sizes = [p["batch"] for p in points]
    largest = max((b for b in sizes if sizes.count(b) > 1), default=max(sizes))
    at = [p["seconds"] for p in points if p["batch"] == largest]
    warm = at[1:] or at
    accumulation = cfg.training.gradient_accumulation_steps
    seconds = sum(warm) / len(warm) * batch / largest * accumulation
    micro = f" x {accumulation} micro-batches" if accumulation > 1 else ""
    if largest == batch:
        how = f"measured at batch {batch}{micro}"
    else:
        how = f"batch {largest} measured, scaled to {batch}{micro} (the {budget_s:.0f} s budget of the dry run)"
    peaks = [(p["batch"], float(p["peak_bytes"])) for p in points if p["peak_bytes"]]
    fit = fit_line(peaks) if len({b for b, _ in peaks}) > 1 else None
    if fit is not None:
        peak = fit.predict(batch)
    else:  # one batch size only: the slope from the model's saved activations, as doctor does
        peak = peaks[-1][1] + (batch - peaks[-1][0]) * activation_bytes * ONE_POINT_SLOPE_PRIOR if peaks else None
    notes = [prober.precision.note] if prober.precision.note else []
    return StepTiming(seconds, prober.precision.name, peak, budget, how, points, notes)


def plan_train(cfg: Config, budget_s: float = MEASURE_BUDGET_S,
               on_progress: Callable[[str], None] | None = None) -> TrainPlan:
    """What ``train`` would do with ``cfg`` and about how long and how much memory it would take; writes nothing."""
    started = time.perf_counter()
    cfg = with_absolute_paths(cfg)
    check_attention_resolutions(cfg.model)
    check_new_run(cfg)
    for folder, option in ((cfg.run_dir, "--working-directory"), (cfg.generated_dir, "--generated-directory")):
        why = cannot_write(folder)
        if why:
            raise ConfigError(f"cannot write to {folder}: {why}; pass a {option} you can write to")
    t = cfg.training
    dataset, data = build_dataset(cfg.data.path_to_data, cfg.model.img_size)
    notes = [n for n in [upscale_note(dataset, cfg.model.img_size), loader_workers(cfg.data.num_workers, dataset)[1]]
             if n]
    device = select_device(cfg.run.device)
    # The attention the network will run (model.spell_out_attention): N x N weights kept on MPS and in low
    # precision on the CPU, a fused kernel otherwise; it decides the memory slope when one batch size is measured.
    spelled = device.type == "mps" or (device.type == "cpu" and resolve_precision(t.precision, device).name != "fp32")
    cost = model_cost(cfg, "math" if spelled else "flash")
    timing = measure_steps(cfg, cost.activation_bytes, budget_s, on_progress)
    images = t.batch_size * t.gradient_accumulation_steps
    grids = evaluations(cfg)
    grid_s = total = None
    if timing.seconds is not None:
        per_image = timing.seconds / images
        grid_s = grid_seconds(cfg, per_image)
        total = t.num_training_steps * timing.seconds + grids * grid_s
        notes.append(grid_note(cfg, per_image))
    notes += timing.notes
    if timing.peak_bytes is not None and timing.budget_bytes and timing.peak_bytes > timing.budget_bytes:
        notes.append(f"batch {t.batch_size} would need more memory than this device has: 'ddpmctl doctor' suggests a "
                     "batch size that fits, with --gradient-accumulation-steps for the same effective batch")
    return TrainPlan(
        config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None),  # lists on one line
        device=str(device), precision=timing.precision,
        parameters=cost.parameters, flops_per_image=cost.flops, data=data, notes=notes, images_per_step=images,
        timing=timing, steps=t.num_training_steps, grids=grids, grid_seconds=grid_s, total_seconds=total,
        run_dir=str(cfg.run_dir), run_dir_exists=cfg.run_dir.exists(), generated_dir=str(cfg.generated_dir),
        generated_dir_exists=cfg.generated_dir.exists(),
        checkpoint_bytes=cost.parameters * CHECKPOINT_BYTES_PER_PARAMETER,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------- resume


@dataclass
class ResumePlan:
    run_dir: str
    checkpoint: str | None  # None: no checkpoint yet, the run would start over at step 0
    step: int
    total_steps: int
    loss: float | None
    data: str  # where the data order goes on
    changes: list[str]  # options that differ from the checkpoint's configuration
    set_aside: list[str]  # newer checkpoints that would move into abandoned/
    notes: list[str]
    in_use: bool | None  # another process trains the run now (resume would refuse)


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``option old -> new`` for each option that differs between a saved configuration and ``cfg``."""
    then = flatten(complete_saved(saved), "the checkpoint's configuration")
    now = flatten(to_dict(with_absolute_paths(cfg)))
    out = []
    for name, value in now.items():
        old = then.get(name, value)  # an option the checkpoint predates: as it trained (complete_saved)
        if name in PATH_OPTIONS:  # older checkpoints hold paths as typed
            old = absolute_path(old)
        if name != "resume_from_checkpoint" and old != value:
            out.append(f"{name} {old} -> {value}")
    return out


def plan_resume(cfg: Config) -> ResumePlan:
    """What ``resume`` would restore from the run of ``cfg``: checks the checkpoint's hashes, writes nothing."""
    cfg = with_absolute_paths(cfg)
    run_dir, which = cfg.run_dir, cfg.training.resume_from_checkpoint or "latest"
    dataset, _ = build_dataset(cfg.data.path_to_data, cfg.model.img_size)
    in_use = is_training(run_dir)
    total = cfg.training.num_training_steps
    if which == "latest" and not rundir.list_checkpoints(run_dir):
        return ResumePlan(str(run_dir), None, 0, total, None, "from the start", [], [],
                          [f"{run_dir.name} has no checkpoint yet: the run would start over at step 0"], in_use)
    path, notes = rundir.resolve_checkpoint(run_dir, which)
    meta = checkpoints.read_meta(path)
    saved = meta.get("config", {})
    diffs = model_config_differs(complete_saved(saved), cfg)
    if diffs:
        raise CheckpointError(f"{path.name} was trained with different model settings: {'; '.join(diffs)}; resume "
                              "would refuse (drop those options: 'ddpmctl resume' reads them from config.yaml)")
    step = int(meta["step"])
    position, data_notes = data_position(meta, cfg, len(dataset), 1, name=path.name)
    if position is None:
        where = "from the start of an epoch (the checkpoint holds no data position)"
    elif position["position"]:
        where = f"epoch {position['epoch']}, after {position['position']} of its {len(dataset)} images"
    else:
        where = f"at the start of epoch {position['epoch']}"
    newer = [c.name for c in rundir.list_checkpoints(run_dir) if c.complete and c.step > step]
    if step >= total:
        notes.append(f"{path.name} is at step {step} already: pass a larger --num-training-steps to go on")
    if in_use:
        notes.append(f"another process is training {run_dir} now: resume would refuse until it stops")
    return ResumePlan(str(run_dir), str(path), step, total, meta.get("loss"), where, config_changes(saved, cfg),
                      [f"{name} -> {ABANDONED}/" for name in newer], notes + data_notes, in_use)

