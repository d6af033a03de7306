"""The command-line surface: help, version, the original script's command lines, user errors."""

from __future__ import annotations

import shlex

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from ddpmctl import __version__
from ddpmctl.cli import train as train_cli
from ddpmctl.cli.main import app

runner = CliRunner()

RECOMMENDED = """
  --experiment_name "celebA_diffusion_m3_ultra" --path_to_data "./celeb_hq_128" --working_directory "./working"
  --generated_directory "./generated" --batch_size 16 --img_size 128 --starting_channels 96
  --num_training_steps 100000 --evaluation_interval 5000 --learning_rate 0.0001 --warmup_steps 5000
  --num_workers 4 --loss_fn mse --max_grad_norm 1.0 --weight_decay 0.0001 --num_keep_checkpoints 2
  --num_generations 5 --plot_freq_interval 100
"""
ADVANCED = """
  --experiment_name "ddpm_experiment" --path_to_data "./data/celeba" --working_directory "./checkpoints"
  --generated_directory "./samples" --num_diffusion_timesteps 1000 --num_training_steps 200000 --batch_size 32
  --gradient_accumulation_steps 2 --learning_rate 1e-4 --warmup_steps 5000 --evaluation_interval 5000
  --img_size 128 --starting_channels 128 --loss_fn "mse" --use_wandb
"""


def command_names() -> list[list[str]]:
    """Every command and sub-command registered on the app (so new commands get a --help test too)."""
    names = [[c.name or c.callback.__name__] for c in app.registered_commands]
    for group in app.registered_groups:
        sub = group.typer_instance
        names.append([group.name])
        names += [[group.name, c.name or c.callback.__name__] for c in sub.registered_commands]
    return names


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ddpmctl {__version__}"


def test_every_command_has_help():
    names = command_names()
    assert ["train"] in names and ["resume"] in names and ["sample"] in names
    for name in names:
        result = runner.invoke(app, [*name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


@pytest.fixture
def captured(monkeypatch):
    """Run `train` up to the engine and keep the resolved config instead of training."""
    seen = {}
    monkeypatch.setattr(train_cli, "run_training", lambda cfg: seen.setdefault("cfg", cfg))
    return seen


def test_recommended_command_line_parses(captured):
    result = runner.invoke(app, ["train", *shlex.split(RECOMMENDED)])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert cfg.run.experiment_name == "celebA_diffusion_m3_ultra"
    assert cfg.data.path_to_data == "./celeb_hq_128" and cfg.data.num_workers == 4
    assert (cfg.training.batch_size, cfg.model.img_size, cfg.model.starting_channels) == (16, 128, 96)
    assert cfg.training.num_training_steps == 100000 and cfg.training.learning_rate == 1e-4
    assert cfg.logging.num_keep_checkpoints == 2 and cfg.sampling.plot_freq_interval == 100


def test_advanced_command_line_parses(captured):
    result = runner.invoke(app, ["train", *shlex.split(ADVANCED)])
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert cfg.training.gradient_accumulation_steps == 2 and cfg.logging.use_wandb is True
    assert cfg.diffusion.num_diffusion_timesteps == 1000 and cfg.model.starting_channels == 128


def test_kebab_and_underscore_spellings_are_the_same(captured):
    runner.invoke(app, ["train", "--batch-size", "3", "--img_size", "64", "--no-random-flip"])
    cfg = captured["cfg"]
    assert cfg.training.batch_size == 3 and cfg.model.img_size == 64 and cfg.data.random_flip is False



def test_missing_data_folder(tmp_path):
    result = runner.invoke(app, ["train", "--path-to-data", str(tmp_path / "nope"), "--working-directory",
                                 str(tmp_path / "w"), "--device", "cpu"])
    assert_one_line_error(result, "does not exist")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["train", "--path-to-data", str(tmp_path / "empty"), "--working-directory",
                                 str(tmp_path / "w"), "--device", "cpu", "--img-size", "16",
                                 "--channel-multipliers", "1,2"])
    assert_one_line_error(result, "no images found")


def test_no_data_given(tmp_path):
    result = runner.invoke(app, ["train", "--working-directory", str(tmp_path / "w"), "--device", "cpu"])
    assert_one_line_error(result, "--path-to-data")


def test_bad_value_and_bad_config_file(tmp_path):
    assert_one_line_error(runner.invoke(app, ["train", "--batch-size", "lots"]), "batch_size must be a number")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batchsize: 3\n")
    assert_one_line_error(runner.invoke(app, ["train", "--config", str(bad)]), "unknown key training.batchsize")


def test_unavailable_device_is_a_user_error(tmp_path, tiny_images):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["train", "--path-to-data", str(tiny_images), "--working-directory",
                                 str(tmp_path / "w"), "--device", "cuda", "--img-size", "16", "--channel-multipliers", "1,2"])
    assert_one_line_error(result, "CUDA is not available")


def test_usage_error_exits_2():
    result = runner.invoke(app, ["train", "--no-such-option", "1"])
    assert result.exit_code == 2


def test_wandb_missing_is_a_clear_hint(tmp_path, tiny_images, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    from conftest import assert_one_line_error, tiny_args

    result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path), "--use-wandb"])
    assert_one_line_error(result, "pip install 'ddpmctl[wandb]'")


def test_resume_without_a_run(tmp_path):
    result = runner.invoke(app, ["resume", "--experiment-name", "ghost", "--working-directory", str(tmp_path)])
    assert_one_line_error(result, "no run to resume")
