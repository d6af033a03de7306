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
import math
import os
import re
import resource
import sys
import time
from typing import Any

import torch

from . import diffusion
from .config import Config, from_dict
from .diffusion import Schedule
from .model import set_low_precision_norms
from .runtime import Precision, build_model, classify_oom, configure_backends, low_precision_norms, resolve_precision
from .step import make_optimizer

# ----------------------------------------------------------------------------- memory readings


def meminfo_bytes(key: str) -> int | None:
    """A field of /proc/meminfo in bytes (Linux), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_ram() -> int | None:
    """RAM a new allocation can get without swapping: MemAvailable on Linux, free+inactive pages on macOS."""
    value = meminfo_bytes("MemAvailable")
    if value is not None or sys.platform != "darwin":
        return value
    try:
        import subprocess

        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        page = int(re.search(r"page size of (\d+)", out).group(1))
        pages = sum(int(m.group(1)) for m in re.finditer(r"Pages (?:free|inactive|speculative):\s+(\d+)", out))
        return pages * page
    except Exception:  # noqa: BLE001 - an unreadable figure is reported as unknown
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def peak_rss() -> int:
    """Peak resident set size of this process: VmHWM (resettable on Linux), else ru_maxrss."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- backends


class CpuBackend:
    """Process peak RSS against the RAM available when the probe started."""

    name = "cpu"
    steps_per_point = 1  # a CPU step is slow; the first step of each size is measured directly

    def __init__(self) -> None:
        self.device = torch.device("cpu")

    def details(self) -> dict[str, Any]:
        return {"available_ram_bytes": available_ram(), "rss_bytes": _status_kib("VmRSS"),
                "peak_resettable": os.path.exists("/proc/self/clear_refs")}

    def budget_bytes(self) -> int:
        # MemAvailable excludes what this process already holds, and its peak RSS includes it.
        return int((available_ram() or 0) + (_status_kib("VmRSS") or 0))

    def precision(self, requested: str) -> Precision:
        return resolve_precision(requested, self.device)

    def reset_peak(self, batch: int) -> None:
        gc.collect()
        reset_peak_rss()  # where it cannot be reset, batches run in ascending order so the peak still grows

    def begin_step(self, batch: int) -> None:
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
    steps_per_point = 2  # the first step of a new shape runs cuDNN autotuning; measure the second

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
    """One model + AdamW (+ EMA copy) at the training precision; runs real training steps on demand."""

    def __init__(self, cfg: Config, backend: CpuBackend):
        self.cfg, self.backend = cfg, backend
        device = backend.device
        configure_backends(device)
        self.precision = backend.precision(cfg.training.precision)
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(cfg).to(device)
        set_low_precision_norms(self.model, low_precision_norms(device))  # as the engine runs it
        self.channels_last = cfg.training.channels_last and device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        t = cfg.training
        self.optimizer = make_optimizer(self.params, t.learning_rate, t.weight_decay, device)
        self.ema = [p.detach().float().clone() for p in self.params] if t.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.use_scaler)
        self.schedule = Schedule(cfg.diffusion, device)
        # Create the AdamW state now (zero gradients), so every measured step holds it, as training does.
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: int) -> None:
        """One optimizer step as the engine takes it: forward, loss, backward, clip, AdamW, EMA."""
        device, cfg, be = self.backend.device, self.cfg, self.backend
        be.begin_step(batch)
        x0 = torch.rand(batch, 3, cfg.model.img_size, cfg.model.img_size, device=device) * 2 - 1
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, self.schedule.num_steps, (batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(self.schedule, x0, t, noise)
        target = diffusion.training_target(self.schedule, x0, t, noise)
        with self.precision.autocast():
            pred = self.model(x_t, t)
        loss = diffusion.loss_fn(pred, target, cfg.diffusion.loss_fn)
        be.sample()
        self.scaler.scale(loss).backward()
        be.sample()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, cfg.training.max_grad_norm or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - cfg.training.ema_decay)
        be.sample()
        del x0, t, noise, x_t, target, pred, loss

    def measure(self, batch: int, phase: str, timed_steps: int = 1) -> dict[str, Any]:
        """Peak memory and speed of training steps at ``batch``; an out-of-memory error is a data point."""
        be = self.backend
        point: dict[str, Any] = {"event": "point", "phase": phase, "batch": batch, "oom": False,
                                 "peak_bytes": None, "seconds": None, "images_per_sec": None, "error": None}
        started = time.perf_counter()
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
            self.optimizer.zero_grad(set_to_none=True)
            be.release()
        point["wall_seconds"] = time.perf_counter() - started
        return point


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _fit(points: list[dict[str, Any]]) -> tuple[float, float] | None:
    from .doctor import fit_line  # the parent's arithmetic, so both sides agree

    ok = [(p["batch"], p["peak_bytes"]) for p in points if not p["oom"] and p["peak_bytes"]]
    fit = fit_line(ok)
    return (fit.intercept, fit.slope) if fit else None


def run_probe(spec: dict[str, Any]) -> None:
    """Warm up, measure batches in ascending order until memory, time or the point budget says stop, then
    train at the predicted largest batch (verify) and, if asked, bisect to the first out-of-memory batch."""
    started = time.perf_counter()
    deadline = started + float(spec.get("deadline_s", 60))
    backend = load_backend(spec.get("backend", "cpu"))
    cfg = from_dict(spec["config"], source="doctor spec")
    details = backend.details()
    budget = backend.budget_bytes()
    prober = Prober(cfg, backend)
    _emit({"event": "start", "backend": backend.name, "device": str(backend.device), "details": details,
           "budget_bytes": budget, "precision": prober.precision.name, "precision_note": prober.precision.note,
           "parameters": sum(p.numel() for p in prober.params), "setup_seconds": time.perf_counter() - started})
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
    if fit and spec.get("bisect") and fit[1] > 0:
        bisect(prober, fit, budget, deadline)
    _emit({"event": "done", "seconds": time.perf_counter() - started})


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
