"""`make demo` end to end at toy size: the module the Makefile names exists and does all three stages."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_makefile_demo_target_names_an_importable_module():
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    module = re.search(r"-m (\S+)", recipe).group(1)
    assert importlib.util.find_spec(module) is not None, module
    assert "--config configs/demo_cpu.yaml" in recipe and (ROOT / "configs" / "demo_cpu.yaml").is_file()


def test_demo_trains_samples_and_says_where(tmp_path):
    import typer

    from ddpmctl.cli.demo import demo

    config = tmp_path / "toy.yaml"
    config.write_text(
        "run: {experiment_name: demo, device: cpu}\n"
        "model: {img_size: 16, starting_channels: 8, channel_multipliers: [1, 2], attention_resolutions: [8], num_heads: 2}\n"
        "diffusion: {num_diffusion_timesteps: 50}\n"
        "data: {num_workers: 0}\n"
        "training: {num_training_steps: 3, batch_size: 8, warmup_steps: 1}\n"
        "sampling: {evaluation_interval: 3, num_generations: 2, sampler: ddim, sampling_steps: 5}\n"
    )
    app = typer.Typer()
    app.command()(demo)
    args = ["--config", str(config), "--data", str(tmp_path / "data"), "--work", str(tmp_path / "w"),
            "--generated", str(tmp_path / "g"), "--out", str(tmp_path / "out"), "--num-images", "24"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "data").glob("*.png"))) == 24
    assert (tmp_path / "out" / "samples.png").is_file() and (tmp_path / "out" / "progression.png").is_file()
    assert (tmp_path / "g" / "demo" / "step_3.png").is_file()
    assert "samples grid" in result.output and "demo done" in result.output
    again = CliRunner().invoke(app, args)  # a rerun continues the finished run and samples again
    assert again.exit_code == 0, again.output
    assert "continuing the existing demo run" in again.output
