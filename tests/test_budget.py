"""doctor --hours: the plan picks the largest size, then width, that reaches the quality knee in the time given,
and its command line trains exactly that long with the benchmark's recipe."""

import dataclasses
import shlex
from pathlib import Path

import typer
from typer.testing import CliRunner

from ddpmctl import budget
from ddpmctl.cli import doctor as doctor_cli
from ddpmctl.cli.main import app
from ddpmctl.config import resolve
from ddpmctl.doctor import run_doctor
from ddpmctl.doctor_report import Cell

KNEE = budget.IMAGES_FOR_GOOD_SAMPLES


def cell(size: int, channels: int, ips: float, max_batch: int = 64, **kw) -> Cell:
    return Cell(size, channels, channels * 1000, max_batch, ips, False, "test", **kw)


def test_the_largest_size_then_the_widest_network_that_reaches_the_knee_in_time():
    one_hour = KNEE / 3600
    table = [cell(32, 32, one_hour * 20), cell(32, 64, one_hour * 8), cell(64, 32, one_hour * 3),
             cell(64, 64, one_hour * 1.5), cell(64, 128, one_hour * 0.9), cell(128, 64, one_hour * 0.2)]
    plan = budget.plan_hours(table, 1.0, 128, effective_batch=64)
    assert (plan.img_size, plan.starting_channels) == (64, 64) and plan.enough
    assert plan.batch_size * plan.gradient_accumulation_steps == 64
    assert abs(plan.num_training_steps * 64 - one_hour * 1.5 * 3600) <= 64  # exactly as many steps as fit
    assert plan.images == plan.num_training_steps * 64
    # More hours reach a larger model; the asked size caps the plan.
    assert budget.plan_hours(table, 6.0, 128, 64).img_size == 128
    assert budget.plan_hours(table, 6.0, 64, 64).starting_channels == 128


def test_when_nothing_reaches_the_knee_the_plan_sees_the_most_images_and_says_so():
    table = [cell(64, 64, 1.0), cell(32, 32, 5.0), cell(32, 64, 3.0)]
    plan = budget.plan_hours(table, 0.5, 128, 64)
    assert (plan.img_size, plan.starting_channels) == (32, 32) and not plan.enough
    assert "expect rough samples" in plan.why


def test_a_cell_that_fits_only_with_gradient_checkpointing_is_planned_with_it():
    table = [cell(32, 32, 0.0, max_batch=0, max_batch_checkpointing=8, images_per_sec_checkpointing=KNEE)]
    plan = budget.plan_hours(table, 1.0, 32, 64)
    assert plan.gradient_checkpointing and plan.batch_size == 8 and plan.gradient_accumulation_steps == 8
    assert "--gradient-checkpointing" in plan.command
    assert budget.plan_hours([cell(32, 32, 0.0, max_batch=0)], 1.0, 32, 64) is None  # nothing fits at all


def test_the_plans_command_is_a_valid_train_command_with_the_recipe():
    plan = budget.plan_hours([cell(32, 64, 100.0)], 2.0, 128, 32)
    words = shlex.split(plan.command)
    assert words[:2] == ["ddpmctl", "train"]
    train = typer.main.get_command(app).commands["train"]
    known = {o for p in train.params for o in p.opts}
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    assert set(flags) <= known, set(flags) - known
    for key, value in budget.RECIPE.items():
        assert flags[f"--{key}"] == value
    assert int(flags["--warmup-steps"]) == budget.warmup_for(plan.num_training_steps) < plan.num_training_steps
    overrides = {k[2:].replace("-", "_"): v for k, v in flags.items()}
    cfg = resolve(None, overrides)  # the options parse and validate together
    assert cfg.training.num_training_steps == plan.num_training_steps == int(100.0 * 7200 / 32)


def test_the_presets_train_the_benchmarks_recipe():
    """The demo and Mac presets and doctor's plans use one recipe (the demo keeps the 2e-3 learning rate measured
    best for its small net; tests/test_quality_bench.py checks the benchmark's "house" recipe is the demo's)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    recipe = resolve(None, {k.replace("-", "_"): v for k, v in budget.RECIPE.items()})
    fields = [("diffusion", "beta_schedule"), ("diffusion", "prediction_type"), ("diffusion", "loss_weighting"),
              ("model", "norm_groups"), ("training", "ema_halflife_images"), ("training", "learning_rate")]
    assert {key.replace("-", "_") for key in budget.RECIPE} == {name for _, name in fields}
    for preset in ("demo_cpu", "mac_64px_16gb", "mac_128px_64gb"):
        cfg = resolve(configs / f"{preset}.yaml", {})
        for section, name in fields:
            if (preset, name) != ("demo_cpu", "learning_rate"):
                assert getattr(getattr(cfg, section), name) == getattr(getattr(recipe, section), name), (preset, name)


def test_doctor_hours_prints_the_plan_first_and_the_asked_model_beside_it(tmp_path: Path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  channel_multipliers: [1, 2]\n  attention_resolutions: [8]\n  num_heads: 2\n"
                      "diffusion:\n  num_diffusion_timesteps: 20\nrun:\n  device: cpu\n")
    reports = []

    def keep(*args, **kwargs):
        reports.append(run_doctor(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(doctor_cli, "run_doctor", keep)
    args = ["doctor", "--config", str(config), "--img-size", "16", "--starting-channels", "8", "--hours", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    plan = reports[0].hours_plan
    assert plan.hours == 0.5 and plan.img_size == 16
    assert {c.starting_channels for c in reports[0].table} == {8, 32, 64, 96, 128}  # the widths the plan weighs
    assert plan.num_training_steps * plan.batch_size * plan.gradient_accumulation_steps == plan.images
    assert f"--config {config}" in plan.command
    text = " ".join(result.output.split())
    assert text.index("best pictures in 0.5 h") < text.index("the model asked for") and plan.command in text
    bad = CliRunner().invoke(app, ["doctor", "--img-size", "16", "--device", "cpu", "--hours", "0"])
    assert bad.exit_code == 1 and "--hours must be positive" in bad.output

    # Without --hours, a recommendation that would train for days points to --hours.
    monkeypatch.setattr(doctor_cli, "run_doctor", lambda *a, **k: dataclasses.replace(
        reports[0], hours_plan=None, recommendation=dataclasses.replace(reports[0].recommendation,
                                                                        estimated_seconds=471 * 86400.0)))
    text = " ".join(CliRunner().invoke(app, args[:-2]).output.split())
    assert "about 471.0 days" in text and "ddpmctl doctor --hours H" in text
