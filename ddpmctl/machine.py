"""What this machine has, as data: OS, Python, torch, backends (CUDA, MPS, CPU), RAM, cores, torch.compile's
prerequisites, DataLoader advice, and checks that fail with the fix. Never prints; ``ddpmctl doctor`` shows it.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .config import Config
from .host import apple_generation, available_ram, command_output, cpu_cores, mac_chip, macos_major, macos_version, total_ram
from .runtime import mps_available, mps_bf16_note

MPS_DEFAULT_HIGH_WATERMARK = 1.7  # torch's default PYTORCH_MPS_HIGH_WATERMARK_RATIO
MPS_CHILD_HIGH_WATERMARK = "1.0"  # in the probe: fail at the recommended maximum instead of swapping


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail or info
    detail: str
    fix: str | None = None  # what to do when the status is warn or fail


@dataclass
class Environment:
    os: str
    machine: str
    python: str
    torch: str
    torch_cuda_build: str | None
    ddpmctl: str
    cpu_cores: int
    torch_threads: int
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    backend: str  # the one training would use (cuda, mps or cpu)
    cuda: dict[str, Any]
    mps: dict[str, Any]
    torch_compile: dict[str, Any]
    dataloader: dict[str, Any]
    checks: list[Check] = field(default_factory=list)


def mps_watermark(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(what is in force, a problem with it or None) for PYTORCH_MPS_HIGH_WATERMARK_RATIO."""
    raw = (env if env is not None else os.environ).get("PYTORCH_MPS_HIGH_WATERMARK_RATIO")
    if raw is None:
        return f"unset (torch default {MPS_DEFAULT_HIGH_WATERMARK} x recommended maximum)", None
    try:
        value = float(raw)
    except ValueError:
        return raw, f"PYTORCH_MPS_HIGH_WATERMARK_RATIO={raw!r} is not a number; MPS will refuse to start"
    if value == 0:
        return raw, "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0 removes the memory limit: a batch too large can freeze macOS"
    if not 0 < value <= 2:
        return raw, f"PYTORCH_MPS_HIGH_WATERMARK_RATIO={raw} is outside (0, 2]; MPS will refuse to start"
    return raw, None


def mps_memory_note(env: dict[str, str] | None = None) -> str:
    """One line for the start of training on MPS: the memory limit in force and what it means."""
    raw = (env if env is not None else os.environ).get("PYTORCH_MPS_HIGH_WATERMARK_RATIO")
    _, problem = mps_watermark(env)
    if problem:
        return problem
    if raw is None:
        return (f"MPS memory limit: PYTORCH_MPS_HIGH_WATERMARK_RATIO is unset, so torch allows "
                f"{MPS_DEFAULT_HIGH_WATERMARK} x the GPU's recommended maximum: a batch too large swaps (slow) "
                "instead of failing; set it to 1.0 to fail fast, and 'ddpmctl doctor' measures what fits")
    if float(raw) > 1:
        return (f"MPS memory limit: PYTORCH_MPS_HIGH_WATERMARK_RATIO={raw} x the GPU's recommended maximum: a batch "
                "too large swaps (slow) instead of failing")
    return (f"MPS memory limit: PYTORCH_MPS_HIGH_WATERMARK_RATIO={raw} x the GPU's recommended maximum: a batch too "
            "large fails with 'MPS backend out of memory' instead of swapping")


def mps_fallback_problem(env: dict[str, str] | None = None) -> str | None:
    """What PYTORCH_ENABLE_MPS_FALLBACK=1 does, when it is set: an op MPS lacks runs on the CPU, silently."""
    raw = (env if env is not None else os.environ).get("PYTORCH_ENABLE_MPS_FALLBACK", "").strip()
    if raw in ("", "0"):
        return None
    return (f"PYTORCH_ENABLE_MPS_FALLBACK={raw}: any op MPS lacks runs on the CPU instead of failing, slowly and "
            "with only a warning; ddpmctl's step is meant to need none, so unset it to see such an op by its name")


def device_notes(cfg: Config, device: torch.device, env: dict[str, str] | None = None) -> list[str]:
    """Notes for the start of training on ``device``: on MPS the memory limit in force, a CPU fallback, and the
    options that have been slow or broken there (docs/apple-silicon.md)."""
    notes = []
    t = cfg.training
    if t.channels_last and device.type != "cuda":
        why = (" (channels-last convolution backward has been slow, even wrong, on MPS in recent PyTorch releases)"
               if device.type == "mps" else "")
        notes.append(f"--channels-last is used on CUDA only{why}; training on {device.type} in NCHW")
    if device.type != "mps":
        return notes
    notes.append(mps_memory_note(env))
    fallback = mps_fallback_problem(env)
    if fallback:
        notes.append(fallback)
    if t.compile:
        notes.append("--compile on MPS: torch.compile's MPS backend is experimental and has run slower than eager "
                     "or failed in recent PyTorch releases; drop --compile if training fails or is slow")
    return notes


def mps_bf16_check(chip: str | None, macos: str | None) -> Check:
    """What --precision bf16 would do on this Mac (macOS 14+ for bf16 on MPS; emulated on M1/M2)."""
    major = macos_major(macos)
    if major is not None and major < 14:
        return Check("MPS bf16", "info", f"macOS {macos}: bf16 on MPS needs macOS 14 or later, so --precision bf16 "
                     "would train in fp32")
    return Check("MPS bf16", "info", mps_bf16_note(apple_generation(chip)))


def child_env(backend: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The probe's environment: on MPS, a high watermark of 1.0 (never 0) so it fails where it should."""
    env = dict(os.environ if base is None else base)
    if backend == "mps":
        env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"] = MPS_CHILD_HIGH_WATERMARK
        try:
            low = float(env.get("PYTORCH_MPS_LOW_WATERMARK_RATIO", "nan"))
        except ValueError:
            low = math.nan
        # torch refuses a low watermark above the high one (its unified-memory default is 1.4).
        env["PYTORCH_MPS_LOW_WATERMARK_RATIO"] = str(low) if 0 < low <= 1.0 else MPS_CHILD_HIGH_WATERMARK
    return env


def compile_prerequisites(backend: str) -> tuple[str, str | None]:
    """Quick look at what torch.compile needs here, without compiling: (status, problem or None)."""
    if sys.platform == "win32":
        return "warn", "torch.compile's default backend does not support Windows; leave --compile off"
    if backend == "mps":
        return "warn", "torch.compile on MPS is experimental in torch; leave --compile off on a Mac"
    if backend == "cuda" and importlib.util.find_spec("triton") is None:
        return "fail", "triton is not installed, so torch.compile cannot build GPU kernels: pip install triton"
    if backend == "cpu" and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        return "fail", "no C compiler on PATH for torch.compile's CPU kernels: install gcc/clang, or leave --compile off"
    return "ok", None


def dataloader_advice(backend: str, cores: int, cfg: Config) -> tuple[dict[str, Any], Check]:
    workers = max(0, min(cores - 1, 8)) if backend != "mps" else max(0, min(cores - 2, 4))
    advice = {
        "num_workers": workers, "pin_memory": backend == "cuda", "persistent_workers": workers > 0,
        "reason": ("pinned host memory only speeds up copies to a CUDA GPU; MPS shares memory with the CPU, so "
                   "pin_memory stays off there (ddpmctl sets it itself)"),
    }
    configured = cfg.data.num_workers
    if configured > cores:
        return advice, Check("dataloader workers", "warn", f"num_workers {configured} > {cores} CPU cores",
                             f"--num-workers {workers}")
    return advice, Check("dataloader workers", "ok", f"num_workers {configured}; {workers} suits {cores} cores")


def environment(cfg: Config, backend: str, compile_result: dict[str, Any] | None = None) -> Environment:
    """What this machine and this Python have; accelerator figures are filled in by the probe's child."""
    checks: list[Check] = []
    cores = cpu_cores()
    ram_avail, ram_total = available_ram(), total_ram()
    cuda_build = torch.version.cuda
    cuda = {"available": torch.cuda.is_available(), "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "build": cuda_build}
    if not cuda["available"] and shutil.which("nvidia-smi") and not cuda_build:
        checks.append(Check("CUDA", "fail", "an NVIDIA driver is installed but this torch build has no CUDA",
                            "install a CUDA build of torch (see pytorch.org/get-started)"))
    elif cuda["available"]:
        checks.append(Check("CUDA", "ok", f"{cuda['device_count']} GPU(s), CUDA {cuda_build}"))
    mps_built = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_built())
    in_force, problem = mps_watermark()
    chip, macos = mac_chip(), macos_version()
    mps = {"available": mps_available(), "built": mps_built, "high_watermark_ratio": in_force,
           "probe_high_watermark_ratio": MPS_CHILD_HIGH_WATERMARK, "chip": chip,
           "chip_generation": apple_generation(chip), "macos": macos}
    if sys.platform == "darwin":
        if platform.machine() == "x86_64" and command_output(["sysctl", "-n", "sysctl.proc_translated"]) == "1":
            checks.append(Check("MPS", "fail", "this Python runs under Rosetta (x86_64), so MPS is not available",
                                "install an arm64 Python (python.org or Homebrew) and reinstall torch"))
        elif not mps["available"]:
            checks.append(Check("MPS", "fail", "MPS is not available (needs Apple Silicon and macOS 12.3+)",
                                "update macOS, and install torch for arm64"))
        else:
            checks.append(Check("MPS", "ok", f"available on {chip or 'this Mac'}, macOS {macos or '?'}; watermark {in_force}"))
    if backend == "mps":
        checks.append(mps_bf16_check(chip, macos))
    if problem:
        checks.append(Check("MPS watermark", "fail", problem, "unset PYTORCH_MPS_HIGH_WATERMARK_RATIO (or set 1.0-1.7)"))
    fallback = mps_fallback_problem()
    if fallback:
        checks.append(Check("MPS fallback", "warn", fallback, "unset PYTORCH_ENABLE_MPS_FALLBACK"))
    if ram_avail is not None and ram_avail < 4 * 2**30:
        checks.append(Check("RAM", "warn", f"only {ram_avail / 2**30:.1f} GiB of RAM available",
                            "close other programs; keep --num-workers low"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        checks.append(Check("CPU load", "warn", f"load average {load:.1f} on {cores} cores: other work is running, so "
                            "the speeds measured now are low", "rerun ddpmctl doctor when the machine is idle"))
    status, why = compile_prerequisites(backend)
    torch_compile = {"status": "not checked", "detail": "prerequisites only; --full compiles a tiny model"}
    if compile_result is not None:
        torch_compile = compile_result
        status, why = ("ok", None) if compile_result["status"] == "works" else ("fail", compile_result["detail"])
    elif status == "ok":
        torch_compile["detail"] = "prerequisites present (not compiled; --full compiles a tiny model)"
    if why:
        torch_compile["detail"] = why
    checks.append(Check("torch.compile", status, torch_compile["detail"],
                        "leave --compile off (the default)" if status != "ok" else None))
    advice, workers_check = dataloader_advice(backend, cores, cfg)
    checks.append(workers_check)
    return Environment(
        os=platform.platform(), machine=platform.machine(), python=platform.python_version(), torch=torch.__version__,
        torch_cuda_build=cuda_build, ddpmctl=__version__, cpu_cores=cores, torch_threads=torch.get_num_threads(),
        ram_total_bytes=ram_total, ram_available_bytes=ram_avail, backend=backend, cuda=cuda, mps=mps,
        torch_compile=torch_compile, dataloader=advice, checks=checks,
    )
