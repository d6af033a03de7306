"""The child side of ``ddpmctl doctor``: real training steps at a few batch sizes, memory read per backend.

Run as ``python -m ddpmctl.doctor_child`` with a JSON spec on stdin; it writes one JSON event per line on
stdout (``start``, then a ``point`` per measured step, then ``done``), so whatever was measured before an
out-of-memory crash, a stuck allocator or a timeout still reaches the parent. Out-of-memory errors are data
points, not crashes. The backend is chosen by name (``cuda``, ``mps``, ``cpu``) or, for tests, by
``module:attr`` naming a class with the same methods (an injected fake).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import time
from typing import Any

import torch

from .config import Config, from_dict
from .host import available_ram, peak_rss, reset_peak_rss, status_bytes
from .memfit import fit_line
from .parts import build_parts
from .runtime import Precision, classify_oom, configure_backends, resolve_precision

# ----------------------------------------------------------------------------- backends


class CpuBackend:
    """Process peak RSS against the RAM available when the probe started."""

    name = "cpu"
    steps_per_point = 1  # a CPU step is slow; the first step of each size is measured directly

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def details(self) -> dict[str, Any]:
        return {"available_ram_bytes": available_ram(), "rss_bytes": status_bytes("VmRSS"),
                "peak_resettable": os.path.exists("/proc/self/clear_refs")}

    def budget_bytes(self) -> int:
        # MemAvailable excludes what this process already holds, and its peak RSS includes it.
        return int((available_ram() or 0) + (status_bytes("VmRSS") or 0))

    def precision(self, requested: str) -> Precision:
        return resolve_precision(requested, self.device)

    def reset_peak(self, batch: int) -> None:
        gc.collect()
        reset_peak_rss()  # where it cannot be reset, batches run in ascending order so the peak still grows

    def begin_step(self, batch: int, checkpointing: bool = False) -> None:
        """Called as each training step starts (fake backends use it to model memory)."""

    def sample(self) -> None:
        """Called after forward, backward and the optimizer step; RSS peaks are tracked by the kernel."""

    def peak_bytes(self) -> int:
        return peak_rss()

    def synchronize(self) -> None:
        pass

    def release(self) -> None:
        gc.collect()


class CudaBackend(CpuBackend):
    """torch.cuda.max_memory_allocated against the free memory when the probe started."""

    name = "cuda"
    steps_per_point = 2  # a new shape's first step autotunes cuDNN and captures the CUDA graph; measure the second

    def __init__(self) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()

    def details(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return {"name": props.name, "total_bytes": int(total), "free_bytes": int(free),
                "capability": f"{props.major}.{props.minor}", "bf16": bool(torch.cuda.is_bf16_supported()),
                "device_count": torch.cuda.device_count()}

    def budget_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free + torch.cuda.memory_allocated(self.device))

    def reset_peak(self, batch: int) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


class MpsBackend(CpuBackend):
    """torch.mps.driver_allocated_memory (sampled during the step) against torch.mps.recommended_max_memory.

    The parent starts this process with PYTORCH_MPS_HIGH_WATERMARK_RATIO=1.0, so an allocation past the
    recommended maximum raises "MPS backend out of memory" here instead of swapping the whole Mac.
    """

    name = "mps"
    steps_per_point = 2

    def __init__(self) -> None:
        self.device = torch.device("mps")
        self._peak = 0

    # The four torch.mps calls, kept apart so a fake backend can replace them.
    def recommended_max(self) -> int:
        return int(torch.mps.recommended_max_memory())

    def driver_allocated(self) -> int:
        return int(torch.mps.driver_allocated_memory())

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def empty_cache(self) -> None:
        torch.mps.empty_cache()

    def details(self) -> dict[str, Any]:
        return {"recommended_max_bytes": self.recommended_max(), "driver_allocated_bytes": self.driver_allocated(),
                "probe_high_watermark_ratio": os.environ.get("PYTORCH_MPS_HIGH_WATERMARK_RATIO"),
                "probe_low_watermark_ratio": os.environ.get("PYTORCH_MPS_LOW_WATERMARK_RATIO")}

    def budget_bytes(self) -> int:
        return self.recommended_max()

    def reset_peak(self, batch: int) -> None:
        gc.collect()
        self.synchronize()
        self.empty_cache()  # the driver figure counts cached blocks too; start each size from a clean cache
        self._peak = self.driver_allocated()

    def sample(self) -> None:
        self._peak = max(self._peak, self.driver_allocated())

    def peak_bytes(self) -> int:
        self.synchronize()
        self.sample()
        return self._peak

    def release(self) -> None:
        gc.collect()
        self.empty_cache()


BACKENDS = {"cpu": CpuBackend, "cuda": CudaBackend, "mps": MpsBackend}


def load_backend(ref: str) -> CpuBackend:
    """A backend by name, or ``module:attr`` naming a class with the same methods (injected fakes)."""
    if ref in BACKENDS:
        return BACKENDS[ref]()
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)()


# ----------------------------------------------------------------------------- the probe


class Prober:
    """The training step ``train`` runs (parts.build_parts: model, AdamW, EMA, precision, CUDA graph), on random images."""

    def __init__(self, cfg: Config, backend: CpuBackend):
        self.cfg, self.backend = cfg, backend
        configure_backends(backend.device)
        self.precision = backend.precision(cfg.training.precision)
        self.parts = build_parts(cfg, backend.device, self.precision)
        self.parts.step.on_phase = backend.sample  # MPS reads its memory between forward and backward
        self.parameters = sum(p.numel() for p in self.parts.model.parameters())

    def step(self, batch: int) -> None:
        """One optimizer step of ``batch`` random images, exactly as training takes it."""
        size = self.cfg.model.img_size
        self.backend.begin_step(batch, self.parts.model.gradient_checkpointing)
        self.parts.step.step([torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)])
        self.backend.sample()

    def measure(self, batch: int, phase: str, timed_steps: int = 1) -> dict[str, Any]:
        """Peak memory and speed of training steps at ``batch``; an out-of-memory error is a data point.

        Phase "checkpointing" measures the step of ``--gradient-checkpointing`` (eager, as training runs it)."""
        be = self.backend
        point: dict[str, Any] = {"event": "point", "phase": phase, "batch": batch, "oom": False,
                                 "peak_bytes": None, "seconds": None, "images_per_sec": None, "error": None}
        started = time.perf_counter()
        self.parts.step.reset_graph(batch)  # on CUDA, a graph captured for this batch size, as training has
        self.parts.model.gradient_checkpointing = phase == "checkpointing"
        if phase == "checkpointing":
            self.parts.step.use_graph = False  # no CUDA graph with checkpointing (step.graph_blocker)
        try:
            for _ in range(be.steps_per_point - 1):  # warm-up steps of a new shape (autotuning, caches)
                self.step(batch)
            be.reset_peak(batch)
            t0 = time.perf_counter()
            for _ in range(timed_steps):
                self.step(batch)
            be.synchronize()
            elapsed = time.perf_counter() - t0
            point.update(peak_bytes=be.peak_bytes(), seconds=elapsed / timed_steps,
                         images_per_sec=batch * timed_steps / max(elapsed, 1e-9))
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            kind = classify_oom(exc)
            if kind is None:
                raise
            point.update(oom=True, error=str(exc).splitlines()[0][:300])
            self.parts.step.zero_grad(force=True)
            be.release()
        point["wall_seconds"] = time.perf_counter() - started
        return point


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _fit(points: list[dict[str, Any]]) -> tuple[float, float] | None:
    ok = [(p["batch"], p["peak_bytes"]) for p in points if not p["oom"] and p["peak_bytes"]]
    fit = fit_line(ok)
    return (fit.intercept, fit.slope) if fit else None


def run_probe(spec: dict[str, Any]) -> None:
    """Warm up, measure batches in ascending order until memory, time or the point budget says stop, then
    train at the predicted largest batch (verify) and, if asked, bisect to the first out-of-memory batch."""
    started = time.perf_counter()
    deadline = started + float(spec.get("deadline_s", 60))
    backend = load_backend(spec.get("backend", "cpu"))
    # Measured without checkpointing first, then with it (phase "checkpointing"): the same parts serve both.
    cfg = from_dict({**spec["config"], "training": {**spec["config"].get("training", {}), "gradient_checkpointing": False}},
                    source="doctor spec")
    details = backend.details()
    budget = backend.budget_bytes()
    prober = Prober(cfg, backend)
    _emit({"event": "start", "backend": backend.name, "device": str(backend.device), "details": details,
           "budget_bytes": budget, "precision": prober.precision.name, "precision_note": prober.precision.note,
           "parameters": prober.parameters, "setup_seconds": time.perf_counter() - started})
    warm = prober.measure(1, "warmup")  # first-call costs (thread pools, kernels, allocator) stay out of the fit
    _emit(warm)
    max_fraction = float(spec.get("max_fraction", 0.5))
    batches = list(spec.get("batches") or [])
    max_points = int(spec.get("max_points", 4))
    points: list[dict[str, Any]] = []
    batch = batches.pop(0) if batches else 1
    per_image = warm["seconds"] or 0.0  # seconds per image per step, to keep within the deadline
    while batch and len(points) < max_points and not warm["oom"]:
        if points and time.perf_counter() + per_image * batch * backend.steps_per_point > deadline:
            break
        point = prober.measure(batch, "fit")
        points.append(point)
        _emit(point)
        if point["oom"] or (point["peak_bytes"] or 0) > max_fraction * budget:
            break
        per_image = point["seconds"] / batch
        batch = batches.pop(0) if batches else (batch * 2 if not spec.get("batches") else None)
    fit = _fit(points)
    headroom = float(spec.get("headroom", 0.15))
    if fit and spec.get("verify") and fit[1] > 0:
        # Train at the predicted largest batch (with headroom, capped for the CPU): proves it fits, gives the speed.
        target = min(int((budget * (1 - headroom) - fit[0]) // fit[1]), int(spec.get("verify_cap") or 1 << 30))
        timed = int(spec.get("timed_steps", 2))
        tried = {p["batch"] for p in points}
        while target >= 1 and target not in tried:
            if time.perf_counter() + per_image * target * (timed + backend.steps_per_point - 1) > deadline:
                target //= 2  # too slow for the time left: time a smaller batch instead
                continue
            point = prober.measure(target, "verify", timed_steps=timed)
            tried.add(target)
            _emit(point)
            if not point["oom"]:
                break
            target = int(target * 0.85)
    deadline += float(spec.get("checkpointing_s", 0))
    if spec.get("checkpointing"):
        measure_checkpointing(prober, points, per_image, deadline)
    if fit and spec.get("bisect") and fit[1] > 0:
        bisect(prober, fit, budget, deadline)
    _emit({"event": "done", "seconds": time.perf_counter() - started})


CHECKPOINTING_TIME = 1.4  # a checkpointed step runs the forward about twice: budget 1.4x the plain step's time


def measure_checkpointing(prober: Prober, points: list[dict[str, Any]], per_image: float, deadline: float) -> None:
    """The checkpointed step at the two largest batches the plain fit trained: its own line, as time allows."""
    sizes = sorted({p["batch"] for p in points if not p["oom"] and p["peak_bytes"]})[-2:]
    for batch in sizes:
        cost = per_image * batch * CHECKPOINTING_TIME * prober.backend.steps_per_point
        if time.perf_counter() + cost > deadline:
            break
        point = prober.measure(batch, "checkpointing")
        _emit(point)
        if point["oom"]:
            break


def bisect(prober: Prober, fit: tuple[float, float], budget: int, deadline: float) -> None:
    """Find the real largest batch (first out-of-memory) around the prediction with no headroom."""
    guess = max(1, int((budget - fit[0]) // fit[1]))
    lo, hi = 0, None  # largest batch seen to fit, smallest seen to fail
    probe = guess
    while time.perf_counter() < deadline:
        point = prober.measure(probe, "bisect")
        _emit(point)
        if point["oom"]:
            hi = probe
        else:
            lo = probe
        if hi is None:
            probe = int(probe * 1.1) + 1
        elif lo == 0:
            probe = max(1, int(probe * 0.9))
            if probe >= hi:
                probe = hi - 1
            if probe < 1:
                break
        else:
            if hi - lo <= max(1, lo // 100):
                break
            probe = (lo + hi) // 2


def run_compile_check(spec: dict[str, Any]) -> None:
    """torch.compile a tiny conv + GroupNorm + SiLU block and train one step with it."""
    backend = load_backend(spec.get("backend", "cpu"))
    device = backend.device
    t0 = time.perf_counter()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU()).to(device)
    compiled = torch.compile(net)
    compiled(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
    backend.synchronize()
    _emit({"event": "compile", "ok": True, "seconds": time.perf_counter() - t0})


def main() -> None:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    try:
        if spec.get("task") == "compile":
            run_compile_check(spec)
        else:
            run_probe(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as data, with the type for diagnosis
        _emit({"event": "error", "type": type(exc).__name__, "message": str(exc).splitlines()[0][:500] if str(exc) else ""})
        sys.exit(1)


if __name__ == "__main__":
    main()
