"""End-to-end training on tiny data: loss falls, outputs land where the contract says."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_args
from typer.testing import CliRunner

from ddpmctl.cli.main import app
from ddpmctl.config import resolve
from ddpmctl.engine import StepStats, TrainFinished, TrainStarted, train
from ddpmctl.events import Evaluating, GridSaved, Note

runner = CliRunner()


def test_loss_falls_on_demo_shapes(tmp_path, tiny_images):
    overrides = {
        "path_to_data": str(tiny_images), "working_directory": str(tmp_path / "w"),
        "generated_directory": str(tmp_path / "g"), "img_size": 16, "starting_channels": 16,
        "channel_multipliers": "1,2", "attention_resolutions": "8", "num_diffusion_timesteps": 100,
        "num_training_steps": 80, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 5,
        "evaluation_interval": 80, "num_workers": 0, "num_generations": 2, "log_interval": 10, "device": "cpu",
    }
    events = []
    result = train(resolve(None, overrides), events.append)
    losses = [e.loss for e in events if isinstance(e, StepStats) and e.logged]
    assert len(losses) == 8
    assert max(losses[-2:]) < 0.6 * losses[0], losses  # the model learns to predict the noise
    assert isinstance(events[0], TrainStarted) and isinstance(events[-1], TrainFinished)
    assert result.step == 80 and result.checkpoint.endswith("checkpoint_80")
    copies = [e.text for e in events if isinstance(e, Note) and "memorization" in e.text]
    assert len(copies) == 1 and copies[0].startswith("step 80, memorization of the grid's samples: likely copies ")


def test_cli_run_writes_the_contracted_layout(tmp_path, tiny_images):
    result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=4, evaluation_interval=2,
                                                     num_keep_checkpoints=1)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "working" / "tiny"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_4"]  # rotation kept the newest
    assert sorted(p.name for p in (tmp_path / "generated" / "tiny").glob("*.png")) == ["step_2.png", "step_4.png"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["batch_size"] == 8 and saved["model"]["img_size"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "images_per_sec", "grad_norm"} <= set(rows[0])
    assert (run / "loss.png").is_file()
    assert "world size 1" in result.output and "done" in result.output


def test_training_again_into_a_finished_run_is_refused(tmp_path, tiny_images):
    args = tiny_args(tiny_images, tmp_path, steps=2)
    assert runner.invoke(app, ["train", *args]).exit_code == 0
    again = runner.invoke(app, ["train", *args])
    assert again.exit_code == 1 and "ddpmctl resume" in again.output and "Traceback" not in again.output


def test_gradient_accumulation_and_other_losses(tmp_path, tiny_images):
    for loss in ("mae", "huber"):
        args = tiny_args(tiny_images, tmp_path / loss, steps=2, gradient_accumulation_steps=2, loss_fn=loss)
        result = runner.invoke(app, ["train", *args])
        assert result.exit_code == 0, result.output
        assert "effective batch 16" in result.output


def test_sample_from_a_run(tmp_path, tiny_images):
    assert runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=2)]).exit_code == 0
    run = tmp_path / "working" / "tiny"
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(out), "--num", "3", "--grid",
                                 "--seed", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_00000.png", "sample_00001.png",
                                                                 "sample_00002.png"]
    assert (out / "progression.png").is_file()
    again = tmp_path / "again"
    runner.invoke(app, ["sample", "--checkpoint", str(run / "checkpoint_2"), "--out", str(again), "--num", "3",
                        "--seed", "1", "--device", "cpu"])
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(out / "sample_00001.png"))
    b = np.asarray(Image.open(again / "sample_00001.png"))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)  # same seed, same images


def test_seed_recommended_line_trains_with_small_sizes(tmp_path, tiny_images):
    line = ["--experiment_name", "celebA_small", "--path_to_data", str(tiny_images), "--working_directory",
            str(tmp_path / "working"), "--generated_directory", str(tmp_path / "generated"), "--batch_size", "4",
            "--img_size", "16", "--starting_channels", "8", "--num_training_steps", "2", "--evaluation_interval", "2",
            "--learning_rate", "0.0001", "--warmup_steps", "1", "--num_workers", "1", "--loss_fn", "mse",
            "--max_grad_norm", "1.0", "--weight_decay", "0.0001", "--num_keep_checkpoints", "2",
            "--num_generations", "2", "--plot_freq_interval", "100", "--num_diffusion_timesteps", "20",
            "--channel_multipliers", "1,2", "--device", "cpu"]
    result = runner.invoke(app, ["train", *line])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "working" / "celebA_small" / "checkpoint_2" / "model.safetensors").is_file()


def test_a_grids_folder_that_cannot_be_written_fails_at_start_not_at_the_first_grid(tmp_path, tiny_images):
    from conftest import assert_one_line_error

    (tmp_path / "afile").write_text("not a folder")
    args = tiny_args(tiny_images, tmp_path, steps=2)
    args[args.index("--generated-directory") + 1] = str(tmp_path / "afile" / "g")
    assert_one_line_error(runner.invoke(app, ["train", *args]), f"cannot write to {tmp_path / 'afile' / 'g' / 'tiny'}",
                          "pass a --generated-directory you can write to")
    assert not list((tmp_path / "working" / "tiny").glob("checkpoint_*"))


def test_a_grid_that_cannot_be_written_mid_run_is_a_note_and_training_goes_on(tmp_path, tiny_images, monkeypatch):
    from ddpmctl import engine

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "save_png", full_disk)
    result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=2, evaluation_interval=1)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "No space left on device; training goes on without this grid" in text
    assert (tmp_path / "working" / "tiny" / "checkpoint_2").is_dir()


# ----------------------------------------------------------------------------- never a silent screen


def test_the_first_step_shows_at_once_and_logs_no_metrics_row(tmp_path, tiny_images):
    cfg = resolve(None, {"path_to_data": str(tiny_images), "working_directory": str(tmp_path / "w"),
                         "generated_directory": str(tmp_path / "g"), "img_size": 16, "starting_channels": 8,
                         "channel_multipliers": "1,2", "attention_resolutions": "8", "num_diffusion_timesteps": 20,
                         "num_training_steps": 5, "batch_size": 8, "warmup_steps": 1, "evaluation_interval": 5,
                         "num_workers": 0, "num_generations": 2, "log_interval": 4, "device": "cpu"})
    events = []
    train(cfg, events.append)
    stats = [e for e in events if isinstance(e, StepStats)]
    assert [(e.step, e.logged) for e in stats] == [(1, False), (4, True), (5, True)]
    first = stats[0]
    assert first.loss is not None and first.images_per_sec > 0 and first.eta > 0 and first.elapsed > 0
    rows = [json.loads(line) for line in (tmp_path / "w" / "ddpm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5]  # the first step's figures are for the screen only
    # The report at step 4 still covers steps 1-4: a look at the window does not empty it.
    assert rows[0]["loss"] != pytest.approx(first.loss)
    notes = [e.text for e in events if isinstance(e, Note)]
    assert any(n.startswith("grids: 2 images sampled with ddpm over all 20 timesteps, one grid, at the end;")
               for n in notes), notes


def test_the_display_shows_the_first_step_with_an_approximate_eta():
    from ddpmctl.cli.train import TrainDisplay

    display = TrainDisplay()
    display(TrainStarted(100, 0, "cpu", "fp32", 1, 10, 16, "data", "run"))
    try:
        display(StepStats(1, 100, 0.5, 1e-4, 0.8, 1.0, 20.0, 99 * 20.0, 0, logged=False))
        task = display.progress.tasks[0]
        assert (task.completed, task.fields["loss"], task.fields["speed"], task.fields["eta"]) == (1, "0.5000", "0.8", "~33:00")
        display(StepStats(10, 100, 0.4, 1e-4, 0.8, 1.0, 200.0, 90 * 20.0, 0))
        assert task.fields["eta"] == "30:00"
    finally:
        display.stop()


def test_grid_sampling_reports_progress_and_the_display_shows_its_eta(tmp_path, tiny_images):
    from ddpmctl.cli.train import TrainDisplay
    from ddpmctl.events import GridProgress

    cfg = resolve(None, {"path_to_data": str(tiny_images), "working_directory": str(tmp_path / "w"),
                         "generated_directory": str(tmp_path / "g"), "img_size": 16, "starting_channels": 8,
                         "channel_multipliers": "1,2", "attention_resolutions": "8", "num_diffusion_timesteps": 30,
                         "num_training_steps": 1, "batch_size": 8, "warmup_steps": 1, "num_workers": 0,
                         "num_generations": 2, "device": "cpu"})
    events = []
    train(cfg, events.append)
    evaluating = next(e for e in events if isinstance(e, Evaluating))
    assert (evaluating.sampler, evaluating.denoise_steps) == ("ddpm", 30)
    progress = [e for e in events if isinstance(e, GridProgress)]
    assert progress[0].done == 1 and (progress[-1].done, progress[-1].total, progress[-1].eta) == (30, 30, 0)
    saved = next(e for e in events if isinstance(e, GridSaved))
    assert events.index(evaluating) < events.index(progress[0]) < events.index(saved)

    display = TrainDisplay()
    display(TrainStarted(100, 0, "cpu", "fp32", 1, 10, 16, "data", "run"))
    try:
        display(Evaluating(100, "ddpm", 1000))
        assert display.progress.tasks[0].description == "sampling grid (ddpm, 1000 steps)"
        display(GridProgress(100, 250, 1000, 30.0, 90.0))
        assert display.progress.tasks[0].description == "sampling grid 250/1000, 1:30 left"
        display(GridSaved(100, "g.png"))
        assert display.progress.tasks[0].description == "training"
    finally:
        display.stop()


def test_a_long_grid_gets_the_cheaper_sampler_named():
    from ddpmctl.estimate import grid_note

    cfg = resolve(None, {"num_training_steps": 100000, "evaluation_interval": 5000, "num_generations": 5})
    # 2 s per image per training step: a ddpm grid is 1000 x 5 images x 2/3 s, about 55 minutes.
    assert grid_note(cfg, 2.0) == (
        "grids: 5 images sampled with ddpm over all 1000 timesteps, 20 grids, one every 5000 steps; about 55:33 each "
        "here; --sampler ddim --sampling-steps 50 would take about 2:46")
    cheap = resolve(None, {"sampler": "ddim", "sampling_steps": 50, "num_training_steps": 12000,
                           "evaluation_interval": 5000})
    assert grid_note(cheap, 0.01) == ("grids: 5 images sampled with ddim over 50 timesteps, 3 grids, one every 5000 "
                                      "steps and at the end; under a second each here")


def test_training_on_small_pictures_says_they_are_upscaled(tmp_path, tiny_images):
    result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=1, img_size=32,
                                                     attention_resolutions="16")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (f"note: 64 of the 64 images in {tiny_images} are smaller than 32 px (most 16 px on the shorter side) and "
            "are upscaled on the fly") in text
    same = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path / "same", steps=1)])
    assert same.exit_code == 0 and "upscaled" not in same.output  # 16 px pictures at --img-size 16
