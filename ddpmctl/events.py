"""What the training loop reports: :func:`ddpmctl.engine.train` hands these to its ``on_event`` callback.

The engine never prints; the CLI renders each event (rich progress, notes, file paths).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainStarted:
    total_steps: int
    start_step: int
    device: str
    precision: str
    world_size: int
    parameters: int
    effective_batch: int
    data: str  # how the data is read
    run_dir: str
    notes: list[str] = field(default_factory=list)


@dataclass
class StepStats:
    step: int
    total_steps: int
    loss: float | None  # mean over the applied steps since the last report (None before any was applied)
    lr: float
    images_per_sec: float
    grad_norm: float
    elapsed: float  # seconds since this process started training
    eta: float  # seconds to the last step at the current speed
    skipped_steps: int
    logged: bool = True  # False: the first step of a process, shown before the first log interval (no metrics row)


@dataclass
class Evaluating:
    step: int
    sampler: str = ""  # the grid's sampler
    denoise_steps: int = 0  # its network calls


@dataclass
class GridProgress:
    step: int  # the training step the grid is sampled at
    done: int  # denoising steps done
    total: int
    elapsed: float  # seconds since the grid started
    eta: float  # seconds to the grid's last denoising step at the speed so far


@dataclass
class GridSaved:
    step: int
    path: str


@dataclass
class CheckpointSaved:
    step: int
    path: str
    removed: list[str]


@dataclass
class Note:
    text: str


@dataclass
class TrainFinished:
    step: int
    checkpoint: str | None
    elapsed: float
    images_per_sec: float
    skipped_steps: int


Event = TrainStarted | StepStats | Evaluating | GridProgress | GridSaved | CheckpointSaved | Note | TrainFinished
