"""The names of a run's files and folders (the run layout of the CLI contract), in one place. A leaf module.

    WORKING_DIRECTORY/EXPERIMENT_NAME/
        config.yaml          RUN_CONFIG: the resolved configuration; what marks a folder as a run
        checkpoint_<step>/   checkpoint_name(step): see checkpoints.py for what is inside
        metrics.jsonl        METRICS: one JSON row per loss read-back
        loss.png             LOSS_PLOT
        abandoned/           ABANDONED: checkpoints newer than the one a run was resumed from
        .lock                LOCK: flock-ed by the process training (or pruning) the run
    GENERATED_DIRECTORY/EXPERIMENT_NAME/
        step_<step>.png      grid_name(step): the progression grid of each evaluation
"""

from __future__ import annotations

import re

RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
ABANDONED = "abandoned"
LOCK = ".lock"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step}"


def grid_name(step: int) -> str:
    return f"step_{step}.png"
