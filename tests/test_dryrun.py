"""``train --dry-run`` and ``resume --dry-run``: what a run would do and cost, and nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_one_line_error, tiny_args
from typer.testing import CliRunner

from ddpmctl.cli.main import app
from ddpmctl.config import resolve
from ddpmctl.dryrun import measure_steps
from ddpmctl.runlock import RunLock

runner = CliRunner()


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``roots`` (hidden ones too) with its size and modification time."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_train_dry_run_reports_the_run_and_writes_nothing(tmp_path, tiny_images):
    before = snapshot(tmp_path, tiny_images)
    result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=6, evaluation_interval=3),
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path, tiny_images) == before  # not a folder, not a lock, not a config.yaml
    text = " ".join(result.output.split())
    for needle in ("ddpmctl train --dry-run: nothing was written", "config (resolved):", "experiment_name: tiny",
                   "channel_multipliers: [1, 2]", "M parameters,", "GFLOPs per image (forward + backward)",
                   "device: cpu (fp32), 8 images per step", "data: 64 images from",
                   "note: grids: 2 images sampled with ddpm over all 20 timesteps, 2 grids, one every 3 steps;",
                   "memory: about", "at the peak of a step, of", "s per step (measured at batch 8): 6 steps take about",
                   "2 grids about", f"writes: {tmp_path / 'working' / 'tiny'} (would be created): config.yaml, "
                   "checkpoint_<step>/, metrics.jsonl, loss.png", f"{tmp_path / 'generated' / 'tiny'} (would be created): "
                   "step_<step>.png"):
        assert needle in text, needle


def test_a_short_budget_scales_batch_one_to_the_configured_batch(tiny_images, tmp_path):
    cfg = resolve(None, {"path_to_data": str(tiny_images), "img_size": 16, "starting_channels": 8,
                         "channel_multipliers": "1,2", "attention_resolutions": "8", "batch_size": 8,
                         "gradient_accumulation_steps": 2, "device": "cpu"})
    timing = measure_steps(cfg, 10**6, budget_s=0.0)
    assert [p["batch"] for p in timing.points] == [1]
    assert timing.seconds == pytest.approx(timing.points[0]["seconds"] * 8 * 2)
    assert timing.how == "batch 1 measured, scaled to 8 x 2 micro-batches (the 0 s budget of the dry run)"
    assert timing.peak_bytes == pytest.approx(timing.points[0]["peak_bytes"] + 7 * 1.5 * 10**6)  # 7 images more
    full = measure_steps(cfg, 10**6, budget_s=5.0)
    batches = [p["batch"] for p in full.points]
    assert batches[:2] == [1, 8] and set(batches) == {1, 8}, batches
    assert full.how == "measured at batch 8 x 2 micro-batches"
    warm = [p["seconds"] for p in full.points if p["batch"] == 8][1:] or [full.points[1]["seconds"]]
    assert full.seconds == pytest.approx(sum(warm) / len(warm) * 2)


def test_train_dry_run_refuses_what_train_would(tmp_path, tiny_images):
    args = tiny_args(tiny_images, tmp_path, steps=2)
    assert runner.invoke(app, ["train", *args]).exit_code == 0
    before = snapshot(tmp_path)
    assert_one_line_error(runner.invoke(app, ["train", *args, "--dry-run"]), "already holds checkpoint_2",
                          "ddpmctl resume --experiment-name tiny")
    (tmp_path / "afile").write_text("x")
    args[args.index("--generated-directory") + 1] = str(tmp_path / "afile" / "g")
    args[args.index("--experiment-name") + 1] = "other"
    assert_one_line_error(runner.invoke(app, ["train", *args, "--dry-run"]), "afile is not a folder",
                          "pass a --generated-directory you can write to")
    assert {k: v for k, v in snapshot(tmp_path).items() if "afile" not in k} == before


@pytest.fixture()
def trained(tmp_path, tiny_images) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (an epoch of 64 images is 8 steps of 8)."""
    args = tiny_args(tiny_images, tmp_path, steps=4, evaluation_interval=2, num_keep_checkpoints=3)
    assert runner.invoke(app, ["train", *args]).exit_code == 0
    return tmp_path / "working"


def test_resume_dry_run_says_what_it_would_restore_without_the_lock(trained):
    run = trained / "tiny"
    with RunLock(run).acquire():  # as if training now: a real resume would refuse, a dry run takes no lock
        before = snapshot(trained.parent)
        result = runner.invoke(app, ["resume", "--experiment-name", "tiny", "--working-directory", str(trained),
                                     "--num-training-steps", "8", "--learning-rate", "0.001", "--dry-run"])
        assert snapshot(trained.parent) == before
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "nothing was written and the run's lock was not taken" in text
    assert f"restore: {run / 'checkpoint_4'} (step 4 of 8, loss " in text
    assert "data: continue epoch 0, after 32 of its 64 images" in text
    assert "changes from the checkpoint's config: num_training_steps 4 -> 8; learning_rate 0.0001 -> 0.001" in text


def test_resume_dry_run_from_an_older_checkpoint_names_what_would_be_set_aside(trained):
    before = snapshot(trained.parent)
    result = runner.invoke(app, ["train", "--experiment-name", "tiny", "--working-directory", str(trained),
                                 "--resume-from-checkpoint", "checkpoint_2", "--device", "cpu", "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "(step 2 of 4, loss" in text and "data: continue epoch 0, after 16 of its 64 images" in text
    assert "changes from the checkpoint's config: none" in text
    assert "set aside (not deleted): checkpoint_4 -> abandoned/" in text
    assert snapshot(trained.parent) == before  # checkpoint_4 is still where it was


def test_resume_dry_run_refuses_other_model_settings(trained):
    assert_one_line_error(runner.invoke(app, ["resume", "--experiment-name", "tiny", "--working-directory",
                                              str(trained), "--img-size", "32", "--dry-run"]),
                          "img_size (checkpoint 16, now 32); resume would refuse")
