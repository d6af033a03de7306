"""The non-finite guard: fused AdamW (CUDA, CPU) skips the update on the device from found_inf, no host wait per
step; skipped steps count as steps and are read back with the loss, the same on every device."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ddpmctl import config as config_mod
from ddpmctl import diffusion
from ddpmctl.engine import Note, TrainFinished, train
from ddpmctl.errors import TrainingStopped


def options(data, tmp_path, name, **extra):
    opts = {
        "experiment_name": name, "path_to_data": str(data), "working_directory": str(tmp_path / "w"),
        "generated_directory": str(tmp_path / "g"), "img_size": 16, "starting_channels": 8,
        "channel_multipliers": "1,2", "attention_resolutions": "8", "num_heads": 2, "num_diffusion_timesteps": 20,
        "batch_size": 4, "warmup_steps": 1, "num_workers": 0, "num_generations": 1, "log_interval": 4,
        "evaluation_interval": 100, "device": "cpu",
    }
    opts.update(extra)
    return config_mod.resolve(None, opts)


@pytest.fixture
def nan_steps(monkeypatch):
    """Make the loss NaN on the listed calls (one call per step here: no accumulation)."""
    real_loss = diffusion.loss_fn
    state = {"n": 0, "bad": set()}

    def loss_fn(pred, target, kind):
        state["n"] += 1
        loss = real_loss(pred, target, kind)
        return loss * float("nan") if state["n"] in state["bad"] else loss

    monkeypatch.setattr(diffusion, "loss_fn", loss_fn)
    return state


def test_deferred_guard_skips_on_the_device_and_counts_at_read_back(tiny_images, tmp_path, nan_steps):
    nan_steps["bad"].update({2, 3})
    events = []
    train(options(tiny_images, tmp_path, "defer", num_training_steps=8, max_bad_steps=3), events.append)
    finished = [e for e in events if isinstance(e, TrainFinished)][0]
    assert finished.step == 8 and finished.skipped_steps == 2  # skipped steps still count as steps
    notes = [e.text for e in events if isinstance(e, Note) and not e.text.startswith("grids: ")]  # the grids' cost
    assert notes == ["steps 1-4: 2 non-finite loss or gradient, update skipped (0 in a row now)"]
    weights = load_file(str(tmp_path / "w" / "defer" / "checkpoint_8" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_deferred_guard_stops_after_max_bad_steps_in_a_row(tiny_images, tmp_path, nan_steps):
    nan_steps["bad"].update(range(3, 100))
    with pytest.raises(TrainingStopped, match="training diverged: 6 non-finite steps in a row at step 8"):
        train(options(tiny_images, tmp_path, "diverge", num_training_steps=20, max_bad_steps=3), None)
