"""What ``ddpmctl doctor`` reports, as data: measured points, the probe's fit, the table's cells and the
suggested command (``DoctorReport.to_dict`` gives the JSON of ``--json``). Built by :mod:`ddpmctl.doctor`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .machine import Environment
from .memfit import Fit


@dataclass
class Point:
    phase: str  # fit, verify, bisect, or checkpointing (the step with --gradient-checkpointing)
    batch: int
    oom: bool
    peak_bytes: int | None
    seconds: float | None  # per step
    images_per_sec: float | None
    error: str | None = None


@dataclass
class Probe:
    img_size: int
    starting_channels: int
    backend: str
    device: str
    precision: str
    precision_note: str | None
    parameters: int
    budget_bytes: int
    headroom: float
    points: list[Point]
    fit: Fit | None
    max_batch: int | None  # largest batch that fits with headroom (None: no usable measurement)
    images_per_sec: float | None  # measured, at images_per_sec_batch
    images_per_sec_batch: int | None
    largest_batch_bisected: int | None  # --full on an accelerator: the real largest batch (first OOM - 1)
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fit_checkpointing: Fit | None = None  # the same, for the step with --gradient-checkpointing
    max_batch_checkpointing: int | None = None
    images_per_sec_checkpointing: float | None = None  # measured at the largest checkpointed batch


@dataclass
class Cell:
    img_size: int
    starting_channels: int
    parameters: int
    max_batch: int | None
    images_per_sec: float | None
    measured: bool
    source: str  # "measured" or what it was extrapolated from
    max_batch_checkpointing: int | None = None  # with --gradient-checkpointing (measured or extrapolated alike)
    images_per_sec_checkpointing: float | None = None


@dataclass
class Recommendation:
    batch_size: int
    gradient_accumulation_steps: int
    effective_batch: int
    images_per_sec: float | None
    num_training_steps: int
    estimated_seconds: float | None  # num_training_steps * effective batch / images per second
    command: str


@dataclass
class HoursPlan:
    hours: float
    img_size: int
    starting_channels: int
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    images_per_sec: float
    num_training_steps: int
    images: int  # training images seen in the hours given
    enough: bool  # reaches budget.IMAGES_FOR_GOOD_SAMPLES
    command: str
    why: str


@dataclass
class DoctorReport:
    schema: int
    mode: str  # quick or full
    seconds: float
    environment: Environment
    probe: Probe | None
    table: list[Cell]
    img_sizes: list[int]
    channels: list[int]
    recommendation: Recommendation | None
    notes: list[str] = field(default_factory=list)
    recommendation_checkpointing: Recommendation | None = None  # when checkpointing reaches the effective batch in fewer steps
    hours_plan: HoursPlan | None = None  # doctor --hours: the model that gives the best pictures in that time

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
