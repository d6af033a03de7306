"""``ddpmctl doctor`` as data: what this machine has, what a model config needs, and what will fit.

This module orchestrates; none of it prints:

* :func:`~ddpmctl.machine.environment` (in ``machine.py``) - OS, Python, torch, backends (CUDA, MPS, CPU),
  torch.compile, DataLoader advice, and checks that fail with the fix.
* :func:`probe` - real training steps (forward, backward, AdamW, EMA, at the training precision) at a few
  batch sizes in a child process (``python -m ddpmctl.doctor_child``), so an out-of-memory error or a stuck
  allocator cannot take the caller down; peak memory = a + b * batch by least squares; the largest batch
  that fits the budget with headroom; the measured images/s.
* the table - a "scaling guidelines" table (image sizes x starting channels) where each cell is the largest
  batch that fits and its speed: measured, or (quick mode) extrapolated (:func:`~ddpmctl.memfit.extrapolate`) from the
  measured cell through each model's activation size and FLOPs counted on the ``meta`` device
  (:func:`~ddpmctl.cost.model_cost`, in ``cost.py``); then one recommended
  ``--batch-size B --gradient-accumulation-steps A`` (:func:`recommendation`). Each cell, and the probe, has
  a second answer for ``--gradient-checkpointing``, suggested when the plain batch is below the effective
  one (:func:`checkpointing_advice`).
* the report's dataclasses live in ``doctor_report.py``.

:func:`run_doctor` ties them together into a :class:`DoctorReport` (``dataclasses.asdict`` gives the JSON).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .budget import plan_hours, recipe_options
from .config import Config, apply_overrides, to_dict
from .cost import ModelCost, model_cost
from .doctor_report import Cell, DoctorReport, Point, Probe, Recommendation
from .errors import ConfigError
from .machine import Check, child_env, environment
from .memfit import BYTES_PER_PARAMETER, Fit, extrapolate, fit_line, limit_by_oom, recommend
from .runtime import select_device

SCHEMA_VERSION = 1
DEFAULT_IMG_SIZES = (64, 128, 256)
DEFAULT_CHANNELS = (64, 96, 128)
# With one measured point only, the slope is the model's saved activations per image times this prior
# (peak memory during backward holds the activations plus gradients of the largest ones).
ONE_POINT_SLOPE_PRIOR = 1.5


# ----------------------------------------------------------------------------- the child process


@dataclass
class ChildRun:
    events: list[dict[str, Any]]
    returncode: int | None
    timed_out: bool
    stderr_tail: str


def run_child(spec: dict[str, Any], env: dict[str, str], timeout: float,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> ChildRun:
    """Run ``python -m ddpmctl.doctor_child`` with ``spec``; collect its events until done, death or timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpmctl.doctor_child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events: list[dict[str, Any]] = []
    stderr: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                events.append(event)
                if on_event:
                    on_event(event)

    def read_err() -> None:
        stderr.extend(proc.stderr)  # type: ignore[arg-type]

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for r in readers:
        r.start()
    proc.stdin.write(json.dumps(spec))  # type: ignore[union-attr]
    proc.stdin.close()  # type: ignore[union-attr]
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for r in readers:
        r.join(timeout=5)
    return ChildRun(events, proc.returncode, timed_out, "".join(stderr)[-2000:])


def backend_name(ref: str) -> str:
    """The backend a child ``ref`` stands for (a ``module:attr`` fake says so in its ``name``)."""
    if ":" not in ref:
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr).name


# ----------------------------------------------------------------------------- probe


@dataclass
class ProbePlan:
    """How hard the child tries: time, points, whether to verify the prediction and bisect to the first OOM."""

    deadline_s: float
    timeout_s: float
    max_points: int
    verify: bool
    bisect: bool
    max_fraction: float = 0.5  # stop growing the batch once the peak passes this fraction of the budget
    verify_cap: int | None = None  # the CPU verifies (and times) at most the effective batch, not its RAM limit
    checkpointing_s: float = 0.0  # extra seconds to measure the --gradient-checkpointing step (0: not measured)


def plan_for(mode: str, backend: str, effective_batch: int = 64) -> ProbePlan:
    accelerator = backend in ("cuda", "mps")
    cap = None if accelerator else effective_batch
    if mode == "quick":
        return ProbePlan(deadline_s=32, timeout_s=65, max_points=5 if accelerator else 3, verify=True, bisect=False,
                         verify_cap=cap, checkpointing_s=15)
    # --full on an accelerator also bisects to the first out-of-memory batch; never on the CPU (it would swap).
    return ProbePlan(deadline_s=240, timeout_s=360, max_points=7 if accelerator else 4, verify=True,
                     bisect=accelerator, verify_cap=cap, checkpointing_s=60)


def probe(cfg: Config, backend_ref: str, plan: ProbePlan, headroom: float = 0.15, env: dict[str, str] | None = None,
          on_event: Callable[[dict[str, Any]], None] | None = None, cost: ModelCost | None = None) -> Probe:
    """Measure ``cfg`` in a child process and fit peak memory = a + b * batch."""
    started = time.perf_counter()
    name = backend_name(backend_ref)
    spec = {"backend": backend_ref, "config": to_dict(cfg), "deadline_s": plan.deadline_s,
            "max_points": plan.max_points, "verify": plan.verify, "bisect": plan.bisect, "headroom": headroom,
            "max_fraction": plan.max_fraction, "verify_cap": plan.verify_cap, "threads": torch.get_num_threads(),
            "checkpointing": plan.checkpointing_s > 0, "checkpointing_s": plan.checkpointing_s}
    run = run_child(spec, child_env(name, env), plan.timeout_s, on_event)
    start = next((e for e in run.events if e["event"] == "start"), {})
    measured = [Point(**{k: e.get(k) for k in ("phase", "batch", "oom", "peak_bytes", "seconds", "images_per_sec", "error")})
                for e in run.events if e["event"] == "point"]
    points = [p for p in measured if p.phase != "checkpointing"]  # the plain step's
    checkpointed = [p for p in measured if p.phase == "checkpointing"]
    notes: list[str] = []
    error = next((e for e in run.events if e["event"] == "error"), None)
    if error:
        notes.append(f"the probe stopped with {error['type']}: {error['message']}")
    elif run.timed_out:
        notes.append(f"the probe was stopped after {plan.timeout_s:.0f} s; the points measured before are used")
    elif run.returncode not in (0, None) and not any(e["event"] == "done" for e in run.events):
        notes.append(f"the probe process died (exit {run.returncode}), likely out of memory; "
                     f"points measured before are used. {run.stderr_tail.strip().splitlines()[-1:] or ''}")
    ok = [(p.batch, float(p.peak_bytes)) for p in points if not p.oom and p.peak_bytes and p.phase != "warmup"]
    fit = fit_line(ok)
    if not ok:  # the warm-up step is a measurement too, if nothing later finished
        ok = [(p.batch, float(p.peak_bytes)) for p in points if not p.oom and p.peak_bytes]
    if fit is None and cost is not None:
        slope = cost.activation_bytes * ONE_POINT_SLOPE_PRIOR
        if ok:
            fit = Fit(ok[0][1] - slope * ok[0][0], slope, 1,
                      f"one measured batch size; slope from the model's activations x {ONE_POINT_SLOPE_PRIOR}")
            notes.append("only one batch size could be measured in time: the fit is rough (rerun when idle, or --full)")
        elif start:
            base = float((start.get("details") or {}).get("rss_bytes") or 0) if name == "cpu" else 0.0
            fit = Fit(base + BYTES_PER_PARAMETER * cost.parameters, slope, 0,
                      "estimated from the model's size: no training step finished in time")
            notes.append("no training step finished in time: the largest batch is an estimate from the model's "
                         "size, not a measurement (rerun when the machine is idle, or with --full)")
    budget = int(start.get("budget_bytes") or 0)
    max_batch = limit_by_oom(fit.max_batch(budget, headroom), points) if fit and budget else None
    timed = [p for p in points if p.images_per_sec and not p.oom and p.phase != "warmup"]
    best = max(timed, key=lambda p: (p.phase == "verify", p.batch), default=None)
    largest = None
    if any(p.phase == "bisect" for p in points) and any(p.oom for p in points):
        first_oom = min(p.batch for p in points if p.oom)
        largest = max((p.batch for p in points if not p.oom and p.batch < first_oom), default=None)
    if start.get("precision_note"):
        notes.append(start["precision_note"])
    fit_ckpt = fit_line([(p.batch, float(p.peak_bytes)) for p in checkpointed if not p.oom and p.peak_bytes])
    max_ckpt = limit_by_oom(fit_ckpt.max_batch(budget, headroom), checkpointed) if fit_ckpt and budget else None
    fastest_ckpt = max((p for p in checkpointed if p.images_per_sec and not p.oom), key=lambda p: p.batch, default=None)
    if plan.checkpointing_s and fit_ckpt is None and fit is not None:
        notes.append("the step with --gradient-checkpointing could not be measured at two batch sizes in time")
    return Probe(
        img_size=cfg.model.img_size, starting_channels=cfg.model.starting_channels, backend=start.get("backend", name),
        device=start.get("device", name), precision=start.get("precision", "?"), precision_note=start.get("precision_note"),
        parameters=int(start.get("parameters") or (cost.parameters if cost else 0)), budget_bytes=budget, headroom=headroom,
        points=measured, fit=fit, max_batch=max_batch, images_per_sec=best.images_per_sec if best else None,
        images_per_sec_batch=best.batch if best else None, largest_batch_bisected=largest,
        seconds=time.perf_counter() - started, details=start.get("details", {}), notes=notes,
        fit_checkpointing=fit_ckpt, max_batch_checkpointing=max_ckpt,
        images_per_sec_checkpointing=fastest_ckpt.images_per_sec if fastest_ckpt else None,
    )


def check_compile(backend_ref: str, timeout: float = 120) -> dict[str, Any]:
    """Compile and train a tiny block with torch.compile in a child, with a time limit."""
    name = backend_name(backend_ref)
    run = run_child({"task": "compile", "backend": backend_ref}, child_env(name), timeout)
    done = next((e for e in run.events if e["event"] == "compile"), None)
    if done:
        return {"status": "works", "detail": f"compiled and trained a tiny block in {done['seconds']:.1f} s"}
    error = next((e for e in run.events if e["event"] == "error"), None)
    why = f"{error['type']}: {error['message']}" if error else ("timed out" if run.timed_out else "the check crashed")
    return {"status": "fails", "detail": f"torch.compile failed here ({why})"}


# ----------------------------------------------------------------------------- suggestions


def cell_config(cfg: Config, img_size: int, channels: int) -> Config:
    return apply_overrides(cfg, {"img_size": img_size, "starting_channels": channels})


def recommendation(cfg: Config, probe_result: Probe, target_effective: int, config_file: str | None,
                   checkpointing: bool = False) -> Recommendation | None:
    """The train command for the largest batch that fits (``checkpointing``: with --gradient-checkpointing)."""
    max_batch = probe_result.max_batch_checkpointing if checkpointing else probe_result.max_batch
    if not max_batch:
        return None
    batch, accum = recommend(max_batch, target_effective)
    steps = cfg.training.num_training_steps
    timed = [p for p in probe_result.points if p.images_per_sec and not p.oom and p.phase != "warmup"
             and (p.phase == "checkpointing") == checkpointing]
    nearest = min(timed, key=lambda p: abs(math.log(p.batch / batch)), default=None)  # speed depends on the batch
    ips = nearest.images_per_sec if nearest else None
    parts = ["ddpmctl", "train"]
    if config_file:
        parts += ["--config", str(config_file)]
    parts += ["--img-size", str(cfg.model.img_size), "--starting-channels", str(cfg.model.starting_channels),
              "--batch-size", str(batch), "--gradient-accumulation-steps", str(accum)]
    if checkpointing:
        parts.append("--gradient-checkpointing")
    if not config_file:  # a config file is the user's recipe; otherwise the benchmark's winner (docs/quality.md)
        parts += recipe_options(steps)
    return Recommendation(batch, accum, batch * accum, ips, steps, steps * batch * accum / ips if ips else None,
                          shlex.join(parts))


def checkpointing_advice(cfg: Config, probe_result: Probe, target_effective: int, config_file: str | None
                         ) -> tuple[Recommendation | None, str | None]:
    """The --gradient-checkpointing command and a note, when the batch that fits without it is below the
    effective batch and checkpointing fits a larger one (fewer accumulation steps, or a model that fits at all)."""
    plain, ckpt = probe_result.max_batch, probe_result.max_batch_checkpointing
    if ckpt is None or plain is None or plain >= target_effective or ckpt <= plain:
        return None, None
    rec = recommendation(cfg, probe_result, target_effective, config_file, checkpointing=True)
    if rec is None:
        return None, None
    speeds = ""
    if rec.images_per_sec and probe_result.images_per_sec:
        speeds = f" ({rec.images_per_sec:,.1f} img/s measured with it, {probe_result.images_per_sec:,.1f} without)"
    fits = f"only {plain} image(s) fit per step" if plain else "not even batch 1 fits"
    return rec, (f"{fits} without checkpointing, below the effective batch {target_effective}: with "
                 f"--gradient-checkpointing {ckpt} fit{speeds}")


# ----------------------------------------------------------------------------- all of it


def run_doctor(cfg: Config, *, full: bool = False, headroom: float = 0.15, effective_batch: int = 64,
               img_sizes: tuple[int, ...] | None = None, channels: tuple[int, ...] | None = None,
               config_file: str | None = None, backend_ref: str | None = None, env: dict[str, str] | None = None,
               on_progress: Callable[[str], None] | None = None, hours: float | None = None) -> DoctorReport:
    """Environment + probe of ``cfg`` + the table and the recommended command line, as one report (``hours``:
    and the model that gives the best pictures in that time, :func:`~ddpmctl.budget.plan_hours`)."""
    started = time.perf_counter()
    say = on_progress or (lambda _m: None)
    if not 0 <= headroom < 1:
        raise ConfigError(f"--headroom must be in [0, 1), got {headroom}")
    if effective_batch < 1:
        raise ConfigError("--effective-batch must be at least 1")
    if hours is not None and not hours > 0:
        raise ConfigError(f"--hours must be positive, got {hours:g}")
    backend_ref = backend_ref or select_device(cfg.run.device).type
    backend = backend_name(backend_ref)
    mode = "full" if full else "quick"
    plan = plan_for(mode, backend, effective_batch)
    sizes = tuple(img_sizes or DEFAULT_IMG_SIZES)
    widths = tuple(channels or DEFAULT_CHANNELS)
    cells = [(s, c) for s in sizes for c in widths]
    for s, c in cells:
        cell_config(cfg, s, c)  # a size the channel multipliers cannot divide is a user error, before any probe
    # Fused attention keeps memory linear in tokens on CUDA; the MPS path spells attention out, and CPU
    # training showed the N x N weights in its peak RSS too, so both are counted with them.
    attention = "flash" if backend == "cuda" else "math"

    key = (cfg.model.img_size, cfg.model.starting_channels)
    costs = {key: model_cost(cfg, attention)}  # needed first: the one-point fallback uses it
    # While the child measures, this process counts the other cells' activations and FLOPs on 'meta'.
    counter = threading.Thread(target=lambda: costs.update(
        {(s, c): model_cost(cell_config(cfg, s, c), attention) for s, c in cells if (s, c) != key}))
    counter.start()
    compile_result = None
    if full:
        say("checking torch.compile on a tiny block")
        compile_result = check_compile(backend_ref)

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "point":
            state = "out of memory" if event["oom"] else f"{(event['peak_bytes'] or 0) / 2**20:,.0f} MiB peak"
            say(f"  batch {event['batch']} ({event['phase']}): {state}")

    say(f"probing {key[0]}px / {key[1]} channels on {backend} ({mode} mode)")
    result = probe(cfg, backend_ref, plan, headroom, env, on_event, costs[key])
    counter.join()
    table: list[Cell] = []
    for s, c in cells:
        if (s, c) == key:
            measured = bool(result.fit and result.fit.points)
            table.append(Cell(s, c, costs[key].parameters, result.max_batch, result.images_per_sec, measured,
                              "measured" if measured else "estimated from the model's size",
                              result.max_batch_checkpointing, result.images_per_sec_checkpointing))
        elif full:
            say(f"probing {s}px / {c} channels")
            other = probe(cell_config(cfg, s, c), backend_ref, dataclasses.replace(plan, bisect=False), headroom, env,
                          on_event, costs[(s, c)])
            ok = bool(other.fit and other.fit.points)
            table.append(Cell(s, c, costs[(s, c)].parameters, other.max_batch, other.images_per_sec, ok,
                              "measured" if ok else "estimated from the model's size",
                              other.max_batch_checkpointing, other.images_per_sec_checkpointing))
        else:
            mb, ips = extrapolate(result.fit, result.budget_bytes, result.headroom, result.images_per_sec,
                                   costs[key], costs[(s, c)])
            # Checkpointed: the same scaling (what a block keeps grows with its activations too), roughly.
            mb_ckpt, ips_ckpt = extrapolate(result.fit_checkpointing, result.budget_bytes, result.headroom,
                                            result.images_per_sec_checkpointing, costs[key], costs[(s, c)])
            source = f"extrapolated from {key[0]}px/{key[1]}ch" + ("" if result.fit and result.fit.points else " (estimated)")
            table.append(Cell(s, c, costs[(s, c)].parameters, mb, ips, False, source, mb_ckpt, ips_ckpt))
    environment_report = environment(cfg, backend, compile_result)
    for name, value in result.details.items():
        (environment_report.cuda if backend == "cuda" else environment_report.mps if backend == "mps" else {})[name] = value
    rec = recommendation(cfg, result, effective_batch, config_file)
    rec_ckpt, ckpt_note = checkpointing_advice(cfg, result, effective_batch, config_file)
    if result.max_batch == 0:
        environment_report.checks.append(Check(
            "fits", "fail", f"not even batch 1 of {key[0]}px/{key[1]}ch fits in {result.budget_bytes / 2**30:.1f} GiB "
            f"with {headroom:.0%} headroom", "lower --starting-channels or --img-size (see the table)"))
    notes = list(result.notes) + ([ckpt_note] if ckpt_note else [])
    if not full:
        notes.append("quick mode measured one cell; the others are extrapolated (--full measures each)")
    hours_plan = plan_hours(table, hours, cfg.model.img_size, effective_batch, config_file) if hours else None
    return DoctorReport(SCHEMA_VERSION, mode, time.perf_counter() - started, environment_report, result, table,
                        list(sizes), list(widths), rec, notes, rec_ckpt, hours_plan)
