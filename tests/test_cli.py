"""The command-line surface: help, version, the original script's command lines, user errors."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

import ddpmctl
from ddpmctl import __version__
from ddpmctl import config as config_mod
from ddpmctl.cli import main as main_cli
from ddpmctl.cli import train as train_cli
from ddpmctl.cli.main import app
from ddpmctl.errors import TrainingStopped
from ddpmctl.events import TrainFinished

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
    values = tmp_path / "values.yaml"
    values.write_text("training:\n  batch_size: lots\n")  # from a file a bad value is a user error, not a usage one
    assert_one_line_error(runner.invoke(app, ["train", "--config", str(values)]), "batch_size must be a number")
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


def flat(text: str) -> str:
    """Output with rich's box lines and all wrapping removed, so a message reads as one string."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--batch-size", "abc"], "Invalid value for '--batch-size': must be a number (int), not 'abc'"),
    (["train", "--batch_size", "abc"], "Invalid value for '--batch-size': must be a number (int), not 'abc'"),
    (["train", "--sampler", "foo"], "Invalid value for '--sampler': must be one of ddpm, ddim, dpmpp2m, heun, not 'foo'"),
    (["train", "--channel-multipliers", "1,x"], "Invalid value for '--channel-multipliers': must be a number (int), "
                                                "not 'x'"),
    (["resume", "--device", "tpu"], "Invalid value for '--device': must be one of auto, cuda, mps, cpu, not 'tpu'"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--sampler", "foo"],
     "Invalid value for '--sampler': must be one of ddpm, ddim, dpmpp2m, heun, not 'foo'"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--device", "tpu"],
     "Invalid value for '--device': must be one of auto, cuda, mps, cpu, not 'tpu'"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--precision", "fp8"],
     "Invalid value for '--precision': must be one of auto, fp32, bf16, fp16, not 'fp8'"),
])
def test_a_bad_option_value_is_a_usage_error(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output) and "Traceback" not in result.output
    assert not any(line.startswith("Error: ") for line in result.output.splitlines())


def test_help_texts_keep_their_brackets():
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert "log to Weights & Biases (pip install 'ddpmctl[wandb]')" in flat(train_help.output)
    evaluate_help = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "250"})
    assert "where reference features are cached [default: ~/.cache/ddpmctl/reference-features]" in flat(
        evaluate_help.output)


def _stop_training(exc: BaseException, request: str | None = None):
    """A stand-in for the engine's train() that fails the way a signal makes it fail."""

    def fake_train(cfg, display, stop):
        if request:
            stop.request(request)
        raise exc

    return fake_train


LONG_WORK = "runs/a-working-directory-whose-name-is-long-enough/that-the-resume-command-passes-80-columns"


def test_a_clean_interrupt_ends_with_the_resume_command_on_one_line(monkeypatch):
    saved = f"{LONG_WORK}/x/checkpoint_332"
    stopped = TrainingStopped(f"interrupted (SIGTERM) at step 332; saved {saved}", saved, 130)
    monkeypatch.setattr(train_cli, "train", _stop_training(stopped, "SIGTERM"))
    result = runner.invoke(app, ["train", "--experiment-name", "x", "--working-directory", LONG_WORK])
    assert result.exit_code == 130, result.output
    assert result.output.splitlines() == [  # no Error line after a saved checkpoint; nothing wrapped at 80 columns
        f"interrupted (SIGTERM) at step 332; saved {saved}",
        f"resume with: ddpmctl resume --experiment-name x --working-directory {LONG_WORK}",
    ]


def test_ctrl_c_before_the_engine_handles_it_says_nothing_was_saved(monkeypatch, tmp_path):
    monkeypatch.setattr(train_cli, "train", _stop_training(KeyboardInterrupt()))
    result = runner.invoke(app, ["train", "--working-directory", str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert result.output == "interrupted before training started; nothing was saved\n"


def test_a_second_ctrl_c_still_stops_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(train_cli, "train", _stop_training(KeyboardInterrupt(), "Ctrl-C"))
    result = runner.invoke(app, ["train", "--experiment-name", "x", "--working-directory", str(tmp_path)])
    assert result.exit_code == 130, result.output
    assert flat(result.output) == ("stopped at once (second Ctrl-C): steps since the last complete checkpoint are lost; "
                                   f"resume with: ddpmctl resume --experiment-name x --working-directory {tmp_path}")


def test_ctrl_c_while_the_command_modules_import_is_one_line_and_exit_130():
    # Ctrl-C lands in whatever import is running: here, that of the train command's module.
    script = (
        "import importlib.abc, sys\n"
        "class CtrlC(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'ddpmctl.cli.train':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        "from ddpmctl.cli.main import main\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(ddpmctl.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, "train"], capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", f"{main_cli.STARTING}\n")


def test_train_resume_latest_without_a_run_starts_one(captured, tmp_path):
    result = runner.invoke(app, ["train", "--resume-from-checkpoint", "latest", "--experiment-name", "new",
                                 "--working-directory", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert captured["cfg"].training.resume_from_checkpoint is None  # a new run
    assert flat(result.output) == f"note: no run at {tmp_path / 'new'} to resume from 'latest': starting a new one"


def test_train_resume_latest_with_a_run_resumes_it(captured, tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    saved = config_mod.apply_overrides(config_mod.Config(), {"experiment_name": "old", "batch_size": 5})
    (run / "config.yaml").write_text(config_mod.dump_yaml(saved))
    result = runner.invoke(app, ["train", "--resume_from_checkpoint", "latest", "--experiment-name", "old",
                                 "--working-directory", str(tmp_path)])
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    cfg = captured["cfg"]
    assert cfg.training.resume_from_checkpoint == "latest" and cfg.training.batch_size == 5  # the run's config.yaml


@pytest.mark.parametrize("args", [
    ["resume", "--resume-from-checkpoint", "latest"],  # resume itself: nothing to resume is an error
    ["train", "--resume-from-checkpoint", "checkpoint_5"],  # a named checkpoint must exist
])
def test_resume_of_a_run_that_does_not_exist_is_still_an_error(args, tmp_path):
    result = runner.invoke(app, [*args, "--experiment-name", "ghost", "--working-directory", str(tmp_path)])
    assert_one_line_error(result, f"no run to resume at {tmp_path / 'ghost'}")


def test_done_line_counts_steps_in_the_right_number(capsys):
    display = train_cli.TrainDisplay()
    display(TrainFinished(step=1, checkpoint="w/x/checkpoint_1", elapsed=3.0, images_per_sec=2.0, skipped_steps=0))
    assert capsys.readouterr().out == "done: 1 step in 0:03 (2.0 img/s overall); last checkpoint w/x/checkpoint_1\n"


def test_ctrl_c_in_any_other_command_is_one_line_and_exit_130(monkeypatch, tmp_path):
    from ddpmctl.cli import sample as sample_cli

    def ctrl_c(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "earlier_outputs", ctrl_c)
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
    assert (result.exit_code, result.stdout, result.stderr) == (130, "", "interrupted\n")
