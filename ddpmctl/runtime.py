"""Where and how to run: device choice, precision, distributed setup, and the models built from a config."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .config import Config
from .errors import ConfigError, DdpmctlError
from .host import apple_generation, mac_chip
from .model import UNet, set_low_precision_norms

T = TypeVar("T")

MPS_OOM_PATTERN = re.compile(r"MPS backend out of memory", re.IGNORECASE)
CUDA_OOM_PATTERNS = (
    re.compile(r"CUDA out of memory", re.IGNORECASE),
    re.compile(r"CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_NOT_ENOUGH_WORKSPACE|CUDNN_STATUS_ALLOC_FAILED"),
)
CPU_OOM_PATTERN = re.compile(r"DefaultCPUAllocator: can't allocate memory", re.IGNORECASE)
ANY_OOM_PATTERN = re.compile(r"out of memory", re.IGNORECASE)


def classify_oom(exc: BaseException) -> str | None:
    """'cuda', 'mps', 'cpu' or 'oom' when ``exc`` means the device ran out of memory, else None.

    torch.OutOfMemoryError (CUDA's, and MPS's in recent torch), or the RuntimeError the allocators of
    MPS, cuBLAS/cuDNN and the CPU raise for the same thing. Other exception types never count.
    """
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(exc)
    if oom_type is not None and isinstance(exc, oom_type):
        return "mps" if MPS_OOM_PATTERN.search(text) else "cuda"
    if not isinstance(exc, RuntimeError):
        return None
    if MPS_OOM_PATTERN.search(text):
        return "mps"
    if any(p.search(text) for p in CUDA_OOM_PATTERNS):
        return "cuda"
    if CPU_OOM_PATTERN.search(text):
        return "cpu"
    if ANY_OOM_PATTERN.search(text):
        return "oom"
    return None


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA, then MPS, then CPU. Asking for a backend that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu")
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not mps_available():
            raise ConfigError("--device mps was asked for but MPS is not available here; use --device auto or cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}: use auto, cuda, mps or cpu")


def mps_supports_bf16() -> bool:
    """bf16 autocast on MPS needs macOS 14+ and a recent torch; probe it rather than guess."""
    try:
        with torch.autocast("mps", dtype=torch.bfloat16):
            (torch.ones(2, 2, device="mps") @ torch.ones(2, 2, device="mps")).cpu()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not supported here"
        return False


def cpu_supports_bf16() -> bool:
    """oneDNN runs bf16 convolutions natively here (AVX-512 / AMX on x86, BF16 extensions on Arm)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Precision:
    """The resolved precision: autocast dtype (None for fp32) and whether a grad scaler is needed."""

    name: str  # fp32, bf16 or fp16
    dtype: torch.dtype | None
    device_type: str
    note: str | None = None  # a one-line explanation when the request had to change, or of what it costs here

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: each weight is used once per forward anyway, and a cache that outlives a
        # CUDA graph capture would hand the graph's memory to eager code.
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA GPUs that support it, fp32 elsewhere (the CPU too: bit-exact runs stay the default;
    MPS too: bf16 there has not been measured faster, see :func:`mps_bf16_note`).

    bf16 asked for explicitly also works on MPS and on CPUs with native bf16; where a request cannot be
    met, the fallback comes with a one-line note.
    """
    kind = device.type
    if requested == "auto":
        if kind == "cuda" and torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, kind)
        return Precision("fp32", None, kind)
    if requested == "fp32":
        return Precision("fp32", None, kind)
    if kind == "cpu":
        if requested == "bf16" and cpu_supports_bf16():
            return Precision("bf16", torch.bfloat16, kind)
        why = "this CPU has no fast bf16" if requested == "bf16" else "fp16 autocast is not used on the CPU"
        return Precision("fp32", None, kind, note=f"{why}; training in fp32")
    if kind == "mps":
        if requested == "bf16" and not mps_supports_bf16():
            return Precision("fp32", None, kind, note="this torch/macOS cannot autocast bf16 on MPS (it needs macOS 14 "
                                                      "or later); training in fp32")
        if requested == "fp16":
            return Precision("fp16", torch.float16, kind)
        return Precision("bf16", torch.bfloat16, kind, note=mps_bf16_note(apple_generation(mac_chip())))
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        return Precision("fp16", torch.float16, kind, note="this GPU has no bf16; using fp16 with a grad scaler")
    return Precision(requested, torch.bfloat16 if requested == "bf16" else torch.float16, kind)


def mps_bf16_note(generation: int | None) -> str:
    """What bf16 costs on this Mac's GPU: M1 and M2 have no bf16 arithmetic (emulated: memory saved, no time);
    newer chips save memory, but bf16 on MPS has run slower than fp32 there too (docs/apple-silicon.md)."""
    if generation in (1, 2):
        return (f"bf16 on an Apple M{generation} GPU is emulated: it saves activation memory but runs no faster "
                "than fp32 (the default on MPS)")
    return ("bf16 on MPS saves activation memory but can run slower than fp32 (the default on MPS); compare both "
            "with 'ddpmctl doctor --precision bf16' and '--precision fp32'")


def generator_device(device: torch.device) -> torch.device:
    """Where seeded noise is drawn for ``device``: CUDA's own generator repeats a seed run after run; MPS's has
    not always done so, so MPS (and the CPU) draw on the CPU and copy: the same seed, the same noise on any Mac."""
    return device if device.type == "cuda" else torch.device("cpu")


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached, unused blocks back (CUDA, MPS): after running out of memory, or when a phase
    with other tensor shapes (sampling a grid) ends, since MPS's driver memory grows with every shape it caches."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# How long the other ranks wait for rank 0 alone (a checkpoint write, an evaluation grid). These waits
# use a gloo group of their own, so no NCCL collective is pending (and no NCCL watchdog is ticking)
# while rank 0 works; if rank 0 dies instead, its peers see the closed connection at once.
HOST_WAIT_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host_group: Any = None  # gloo group (CPU, long timeout) for object gathers and waits on rank 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group torchrun set up (env:// rendezvous): NCCL on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if world <= 1 or dist.is_initialized():
        return info
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name == "mps" or (device_name == "auto" and not use_cuda and mps_available()):
        # gloo cannot all-reduce MPS tensors, and NCCL needs CUDA: there is no backend for DDP on MPS.
        raise ConfigError(f"torchrun needs CUDA GPUs or --device cpu (this would train {world} processes on "
                          "MPS, which torch.distributed cannot do); on one Mac, run ddpmctl without torchrun")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    # The per-step collectives (gradients, loss, stop flag) run on this group; waits for rank 0's
    # checkpoints and grids run on info.host_group, whose timeout is far longer.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    info.host_group = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT)
    return info


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here (on the host group: rank 0 may be writing or sampling for long)."""
    if info.enabled and dist.is_initialized():
        dist.barrier(group=info.host_group)


def build_model(cfg: Config) -> UNet:
    return UNet(cfg.model)


def configure_backends(device: torch.device) -> None:
    """Fast defaults: TF32 matmuls/convolutions and cuDNN autotuning on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def capture_cuda_graph(device: torch.device, warmup: Callable[[], object],
                       body: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``warmup`` eagerly on a side stream (cuDNN autotuning, compilation, lazy state), then record
    ``body`` into a CUDA graph and return it with body's outputs (its static tensors).

    If the capture fails, CUDA is put back in order before body's own error propagates: an invalidated
    capture raises in ``cudaStreamEndCapture`` before PyTorch restores the current stream, tells the
    default generator that capturing is over (its next random draw would fail) and hands back the
    graph's memory pool. The stream is set back, a trivial capture runs the generator's bookkeeping
    again, and the pool is closed and released. If even that fails, a DdpmctlError says so.
    """
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        warmup()
    stream.wait_stream(side)
    graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    failure: list[BaseException] = []  # body's own error: the one capture_end raises afterwards says less

    def recorded() -> T:
        try:
            return body()
        except BaseException as exc:
            failure.append(exc)
            raise

    try:
        # thread_local: the data loader's pin-memory thread keeps calling CUDA while this thread captures
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = recorded()
    except Exception as exc:
        cause = failure[0] if failure else exc
        try:
            torch.cuda.set_stream(stream)
            with contextlib.suppress(RuntimeError):
                torch.cuda.synchronize(device)
            with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                torch.zeros(1, device=device)
        except Exception:  # noqa: BLE001 - CUDA itself is in trouble now
            raise DdpmctlError(f"CUDA graph capture failed ({type(cause).__name__}: {str(cause)[:120]}) and CUDA "
                               "did not recover; rerun with --no-cuda-graph") from exc
        index = device.index if device.index is not None else torch.cuda.current_device()
        with contextlib.suppress(Exception):  # a capture that ended cleanly released its pool itself: then this raises
            torch._C._cuda_endAllocateToPool(index, pool)
            torch._C._cuda_releasePool(index, pool)
        raise cause from (None if cause is exc else exc)
    return graph, out


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` is torch.compile's wrapper (an OptimizedModule)."""
    return hasattr(model, "_orig_mod")


def low_precision_norms(device: torch.device) -> bool:
    """Whether GroupNorm runs in autocast's dtype on this device (model.GroupNorm); CUDA autocast would use fp32,
    which measured slower (docs/performance.md)."""
    return device.type == "cuda"


def prepare_for_sampling(model: torch.nn.Module, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """The inference fast path: low-precision norms on CUDA, optionally compiled (NCHW, as training).

    Compiled on CUDA, it uses the compiler's own CUDA graphs (mode="reduce-overhead"): replaying
    ddpmctl's whole-loop graph around a compiled network crashed (torch 2.11, docs/performance.md), so
    sampling.SamplingGraphs skips compiled models. Uncompiled, SamplingGraphs captures the loop itself.
    Compiled on the CPU, the weights are frozen into the compiled graph (see FrozenCompiled), so the
    caller must not change them afterwards (inference.load_model never does).
    """
    set_low_precision_norms(model, low_precision_norms(device))
    if not compile:
        return model
    if device.type == "cuda":
        return torch.compile(model, mode="reduce-overhead")
    return FrozenCompiled(model) if device.type == "cpu" else torch.compile(model)


class FrozenCompiled(torch.nn.Module):
    """torch.compile for inference with the weights frozen in: constants folded, oneDNN convolutions with
    pre-packed weights on the CPU (faster than eager: docs/performance.md). Inductor reads its ``freezing``
    switch while Dynamo traces, i.e. during the call, so each call turns it on (``torch.compile(options=...)``
    is applied too late to freeze anything).
    Freezing applies to calls without autograd (sampling); a call that records gradients compiles apart.
    """

    def __init__(self, model: torch.nn.Module, **compile_kwargs: Any):
        super().__init__()
        self._orig_mod = model  # as torch.compile's wrapper: is_compiled() and the original stay reachable
        self.compiled = torch.compile(model, **compile_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)
