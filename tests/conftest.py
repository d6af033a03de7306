"""Shared fixtures: tiny configs and tiny image folders so every test runs on the CPU in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpmctl.config import resolve
from ddpmctl.demo_data import make_demo_dataset
from ddpmctl.engine import train

# Tiny models run fastest on one thread, and two OpenMP threads on a busy 2-core machine spin against
# each other (up to 15x slower): every test runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    """One thread again after a test that changed it: bit-exact comparisons need one fixed reduction order (and
    the subprocesses use one thread too)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 demo images of 16 px (built once per session)."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_images"), num_images=64, size=16, seed=0)


def train_tiny_run(work: Path, images: Path) -> Path:
    """A 2-step tiny run on ``images`` (one checkpoint, one grid); returns its run folder."""
    cfg = resolve(None, {
        "experiment_name": "tiny", "path_to_data": str(images), "working_directory": str(work / "working"),
        "generated_directory": str(work / "generated"), "img_size": 16, "starting_channels": 8,
        "channel_multipliers": "1,2", "attention_resolutions": "8", "num_heads": 2, "num_diffusion_timesteps": 20,
        "num_training_steps": 2, "batch_size": 8, "warmup_steps": 1, "evaluation_interval": 2, "num_workers": 0,
        "num_generations": 1, "log_interval": 1, "device": "cpu",
    })
    train(cfg)
    return cfg.run_dir


def tiny_args(data: Path, work: Path, steps: int = 4, **extra: object) -> list[str]:
    """Command-line options for a training run that takes a second or two."""
    args = {
        "experiment-name": "tiny", "path-to-data": data, "working-directory": work / "working",
        "generated-directory": work / "generated", "img-size": 16, "starting-channels": 8,
        "channel-multipliers": "1,2", "num-res-blocks": 1, "attention-resolutions": "8", "num-heads": 2,
        "num-diffusion-timesteps": 20, "num-training-steps": steps, "batch-size": 8, "warmup-steps": 1,
        "evaluation-interval": steps, "num-workers": 0, "num-generations": 2, "plot-freq-interval": 5,
        "log-interval": 1, "device": "cpu",
    }
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    out: list[str] = []
    for key, value in args.items():
        out += [f"--{key}", str(value)]
    return out


def assert_one_line_error(result, *needles: str) -> None:
    """A user error: exit 1, no traceback or stray exception, and an ``Error: ...`` line last, naming each needle."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, result.output
