"""Sampling from trained runs: EMA, seeds, batching, grids, the sample CLI, and what training logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ddpmctl import checkpoints
from ddpmctl.cli.main import app
from ddpmctl.config import resolve
from ddpmctl.engine import train
from ddpmctl.errors import DdpmctlError
from ddpmctl.inference import generate, iter_samples, load_model
from ddpmctl.sampling import SampleResult, grid_size, progression_grid, record_steps, save_png, tile, to_uint8
from ddpmctl.state import EMA

runner = CliRunner()



def tiny_overrides(data: Path, work: Path, **extra: object) -> dict:
    base = {
        "experiment_name": "tiny", "path_to_data": str(data), "working_directory": str(work / "working"),
        "generated_directory": str(work / "generated"), "img_size": 16, "starting_channels": 8,
        "channel_multipliers": "1,2", "attention_resolutions": "8", "num_heads": 2, "num_diffusion_timesteps": 20,
        "num_training_steps": 4, "batch_size": 8, "warmup_steps": 1, "evaluation_interval": 2, "num_workers": 0,
        "num_generations": 2, "plot_freq_interval": 5, "log_interval": 1, "device": "cpu", "ema_decay": 0.9,
        "learning_rate": 1e-3,
    }
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path) -> Path:
    """A 4-step run (checkpoints and grids at steps 2 and 4) shared by the tests below."""
    work = tmp_path_factory.mktemp("sampling_run")
    train(resolve(None, tiny_overrides(tiny_images, work)))
    return work


# ----------------------------------------------------------------------------- EMA


def test_ema_update_and_warmup_arithmetic():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9999, warmup=True)
    # Warm-up: decay_n = min(decay, (1 + n) / (10 + n)) for the n-th update (n from 0).
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 4.0]):
        d = min(0.9999, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        expected = d * expected + (1 - d) * w
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.num_updates == 3
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9999  # the ramp ends at the configured decay
    plain = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    plain.update(model)
    assert plain.model.weight.item() == pytest.approx(0.5 * 4.0)
    assert plain.model.weight.dtype == torch.float32


def test_ema_is_saved_and_used_by_default(tiny_run):
    run = tiny_run / "working" / "tiny"
    ckpt = run / "checkpoint_4"
    ema_w, raw_w = (checkpoints.load_weights(ckpt, name) for name in (checkpoints.EMA, checkpoints.MODEL))
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in raw_w)  # the average differs from the last weights
    loaded = load_model(run, device="cpu")
    assert loaded.ema and loaded.step == 4
    for k, v in loaded.model.state_dict().items():
        torch.testing.assert_close(v, ema_w[k])
    raw = load_model(run, device="cpu", use_ema=False)
    assert not raw.ema
    for k, v in raw.model.state_dict().items():
        torch.testing.assert_close(v, raw_w[k])


# ----------------------------------------------------------------------------- seeds and batches


def _images(loaded, **kw) -> torch.Tensor:
    return torch.cat([b.images for b in iter_samples(loaded, **kw)])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeded_sampling_repeats_exactly(tiny_run, sampler):
    loaded = load_model(tiny_run / "working" / "tiny", device="cpu")
    kw = dict(num=3, sampler=sampler, steps=10, eta=1.0, batch_size=2)
    a, b = _images(loaded, seed=7, **kw), _images(loaded, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _images(loaded, seed=8, **kw))
    # Each image's noise depends on (seed, index) only: another batch size gives the same images.
    c = _images(loaded, seed=7, **{**kw, "batch_size": 3})
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_compiled_sampling_on_the_cpu_gives_the_eager_images_from_frozen_weights(tiny_run):
    """--compile on the CPU freezes the loaded weights into inductor's graph: same images, EMA weights kept."""
    run = tiny_run / "working" / "tiny"
    kw = dict(num=2, sampler="ddim", steps=3, seed=5, batch_size=2)
    expected = _images(load_model(run, device="cpu"), **kw)
    compiled = load_model(run, device="cpu", compile=True)
    torch.testing.assert_close(_images(compiled, **kw), expected, rtol=1e-3, atol=1e-3)
    # Frozen: the compiled graph holds constants made from the weights it saw, so a later change of the
    # weights no longer reaches it (which is why nothing may change them; unfrozen, it would follow).
    net = compiled.model._orig_mod
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 10)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
        assert not torch.allclose(compiled.model(x, t), net(x, t), rtol=1e-3, atol=1e-3)


class OomAbove(torch.nn.Module):
    """Wraps a model and raises CUDA's out-of-memory error for batches larger than ``limit``."""

    def __init__(self, model: torch.nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.calls = model, limit, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x, t)


def test_out_of_memory_halves_the_batch_and_keeps_the_images(tiny_run):
    loaded = load_model(tiny_run / "working" / "tiny", device="cpu")
    kw = dict(num=5, sampler="ddim", steps=4, seed=3)
    expected = _images(loaded, batch_size=2, **kw)
    loaded.model = OomAbove(loaded.model, limit=2)
    notes = []
    got = _images(loaded, batch_size=8, on_progress=lambda p: p.note and notes.append(p.note), **kw)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert notes == ["out of memory at batch size 5; continuing with --batch-size 2"]
    loaded.model = OomAbove(loaded.model.model, limit=0)
    with pytest.raises(DdpmctlError, match="out of memory on cpu even for one image"):
        _images(loaded, batch_size=4, **kw)


def test_progress_counts_every_image_step(tiny_run):
    loaded = load_model(tiny_run / "working" / "tiny", device="cpu")
    seen = []
    _images(loaded, num=5, sampler="ddim", steps=3, batch_size=2, on_progress=seen.append)
    assert seen[-1].units_done == seen[-1].units_total == 15 and seen[-1].images_done == 5
    assert [p.units_done for p in seen] == sorted(p.units_done for p in seen)


# ----------------------------------------------------------------------------- grids


def test_record_steps_columns():
    ddpm = list(range(999, -1, -1))
    assert record_steps(ddpm, 100) == [999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    ddim = [999 - 20 * i for i in range(50)]
    cols = record_steps(ddim, 100, num_steps=1000)  # as many columns as DDPM, evenly spaced
    assert len(cols) == 11 and cols[0] == 999 and cols[-1] == 19
    capped = record_steps(ddpm, 10, max_frames=24)  # 101 candidate columns, thinned evenly
    assert len(capped) == 24 and capped[0] == 999 and capped[-1] == 0 and capped == sorted(capped, reverse=True)


@pytest.mark.parametrize("show_x0", [False, True])
def test_grid_layout(show_x0):
    rows, frames, h, w = 3, 4, 8, 6
    result = SampleResult(
        images=torch.zeros(rows, 3, h, w), frames=[torch.zeros(rows, 3, h, w)] * frames,
        frames_x0=[torch.ones(rows, 3, h, w)] * frames, frame_steps=list(range(frames)),
    )
    grid = progression_grid(result, show_x0)
    columns = frames + 1  # x_T ... and the final image
    r = rows * (2 if show_x0 else 1)
    assert grid.shape == (3, r * h + (r - 1) * 2, columns * w + (columns - 1) * 2)
    assert grid.shape[1:] == grid_size(rows, columns, h, w, show_x0)
    assert grid.min() >= -1 and grid.max() <= 1  # [-1, 1], like the samples
    assert torch.all(grid[:, h : h + 2, :] == 1.0)  # white padding between rows
    if show_x0:  # the second row is x0_hat (1.0 -> white) except its last tile, the final image
        assert torch.all(grid[:, h + 2 : 2 * h + 2, : w] == 1.0)
        assert torch.all(grid[:, h + 2 : 2 * h + 2, -w:] == 0.0)


def test_tile_layout_and_png_round_trip(tmp_path):
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)])
    sheet = tile(images, 3, pad=2, pad_value=1.0)  # two rows of three, the last one short
    assert sheet.shape == (3, 2 * 4 + 2, 3 * 5 + 2 * 2)
    assert torch.all(sheet[:, :4, 7:12] == -0.5) and torch.all(sheet[:, 6:, 7:12] == 1.0)  # tile 1, tile 4
    assert torch.all(sheet[:, 6:, 14:] == 1.0)  # the missing sixth tile is background
    path = save_png(sheet, tmp_path / "sheet.png")
    with Image.open(path) as im:
        pixels = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(pixels, to_uint8(sheet))  # the same rounding the evaluation uses
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]  # no temporary file left behind


def test_generate_writes_any_number_and_the_grid(tiny_run):
    loaded = load_model(tiny_run / "working" / "tiny", device="cpu")
    out = tiny_run / "gen"
    res = generate(loaded, out, 5, sampler="ddpm", batch_size=2, grid=True, show_x0=True, contact_sheet=True)
    assert [p.name for p in res.images] == [f"sample_{i:05d}.png" for i in range(5)]
    expected = to_uint8(_images(loaded, num=5, sampler="ddpm", batch_size=2))
    with Image.open(res.images[3]) as im:  # the PNG holds exactly the sampled pixels
        assert torch.equal(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), expected[3])
    # DDPM over 20 timesteps, a column every 5: x_19, x_15, x_10, x_5, x_0, then the final image.
    with Image.open(res.grid) as im:
        assert (im.height, im.width) == grid_size(2, 6, 16, 16, show_x0=True)
    assert res.sheet is not None and res.sheet.is_file()


# ----------------------------------------------------------------------------- the sample command


def test_sample_cli(tiny_run):
    out = tiny_run / "cli_out"
    result = runner.invoke(app, ["sample", "--checkpoint", str(tiny_run / "working" / "tiny"), "--out", str(out),
                                 "--num", "3", "--batch-size", "2", "--sampler", "dpmpp2m", "--steps", "4", "--grid",
                                 "--seed", "1", "--no-ema"])
    assert result.exit_code == 0, result.output
    assert "raw weights" in result.output and "dpmpp2m, 4 steps" in result.output
    assert len(list(out.glob("sample_*.png"))) == 3 and (out / "progression.png").is_file()


def test_sample_cli_defaults_to_the_sampler_measured_best_for_the_objective(tiny_run):
    out = tiny_run / "default_out"
    result = runner.invoke(app, ["sample", "--checkpoint", str(tiny_run / "working" / "tiny"), "--out", str(out),
                                 "--num", "1"])
    assert result.exit_code == 0, result.output
    assert "dpmpp2m, 20 steps" in result.output  # a ddpm model: DPM-Solver++(2M) at its recommended 20 steps (T = 20)


@pytest.mark.parametrize("args, message", [
    (["--steps", "21", "--sampler", "ddim"], "--steps must be at most 20"),
    (["--steps", "5", "--sampler", "ddpm"], "--steps applies to --sampler ddim, dpmpp2m or heun"),
])
def test_sample_cli_user_errors(tiny_run, args, message):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tiny_run / "working" / "tiny"), "--out",
                                 str(tiny_run / "x"), *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_an_unknown_sampler_is_a_usage_error(tiny_run):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tiny_run / "working" / "tiny"), "--out",
                                 str(tiny_run / "x"), "--sampler", "euler"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--sampler'" in result.output and "'euler'" in result.output  # in Typer's box


def _sample(run: Path, out: Path, *extra: str):
    return runner.invoke(app, ["sample", "--checkpoint", str(run / "working" / "tiny"), "--out", str(out), "--num", "2",
                               "--sampler", "ddim", "--steps", "2", *extra])


def test_sample_cli_refuses_a_file_and_earlier_samples_unless_force(tiny_run, tmp_path):
    file = tmp_path / "taken.png"
    file.write_bytes(b"x")
    res = _sample(tiny_run, file)
    assert res.exit_code == 1 and "is a file" in res.output and "Traceback" not in res.output
    out = tmp_path / "out"
    assert _sample(tiny_run, out, "--num", "3", "--grid").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    res = _sample(tiny_run, out)
    assert res.exit_code == 1 and "--force" in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error:")]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".png"} == before  # untouched
    res = _sample(tiny_run, out, "--force", "--seed", "9")
    assert res.exit_code == 0, res.output
    # Only the new run's files (and the user's own) remain: no sample_00002.png or progression.png from before.
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sample_00000.png", "sample_00001.png"]
    assert (out / "sample_00000.png").read_bytes() != before["sample_00000.png"]
    assert "--force" in runner.invoke(app, ["sample", "--help"]).output


def test_sample_cli_compile_reaches_torch_compile(tiny_run, tmp_path, monkeypatch):
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = _sample(tiny_run, tmp_path / "c", "--compile", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert modes == [None]  # compiled once; CUDA graphs (reduce-overhead) are for CUDA only
    assert len(list((tmp_path / "c").glob("sample_*.png"))) == 2


def test_sample_cli_no_cuda_graph_reaches_load_model(tiny_run, tmp_path, monkeypatch):
    from ddpmctl.cli import sample as sample_cli

    seen = []
    real = sample_cli.load_model

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cuda_graph"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_cli, "load_model", spy)
    assert _sample(tiny_run, tmp_path / "a", "--device", "cpu").exit_code == 0
    assert _sample(tiny_run, tmp_path / "b", "--device", "cpu", "--no-cuda-graph").exit_code == 0
    assert seen == [True, False]


def test_sample_cli_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- what training writes


def test_metrics_jsonl_and_loss_plot(tiny_run):
    run = tiny_run / "working" / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "images_per_sec", "grad_norm"} <= r.keys()
        assert r["loss"] > 0 and r["images_per_sec"] > 0 and r["grad_norm"] >= 0
    with Image.open(run / "loss.png") as im:
        assert im.format == "PNG" and im.width > 100
    assert sorted(p.name for p in (tiny_run / "generated" / "tiny").glob("*.png")) == ["step_2.png", "step_4.png"]


def test_wandb_offline_run_logs_loss_lr_and_grid(tmp_path, tiny_images, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    cfg = resolve(None, tiny_overrides(tiny_images, tmp_path, use_wandb=True, num_training_steps=2))
    train(cfg)
    import wandb

    wandb.teardown()  # stop the wandb-core service so the offline log is flushed to disk
    runs = list(cfg.run_dir.rglob("offline-run-*")) + list((tmp_path / "wandb").rglob("offline-run-*"))
    assert runs, "no offline run folder"
    log = next(runs[0].glob("*.wandb")).read_bytes()  # protobuf records: the keys appear verbatim
    for key in (b"loss", b"lr", b"grad_norm", b"images_per_sec", b"grid", b"image-file"):
        assert key in log, key
    assert list((runs[0] / "files" / "media" / "images").glob("grid_2_*.png"))  # the step-2 grid


def test_wandb_missing_is_a_clear_hint(tmp_path, tiny_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    args = ["--use-wandb"]
    for k, v in tiny_overrides(tiny_images, tmp_path).items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 1, result.output
    assert "pip install 'ddpmctl[wandb]'" in result.output and "Traceback" not in result.output


def test_sample_cli_grid_columns_follow_plot_freq_interval(tiny_run):
    out = tiny_run / "cli_cols"
    result = runner.invoke(app, ["sample", "--checkpoint", str(tiny_run / "working" / "tiny"), "--out", str(out),
                                 "--num", "2", "--grid", "--plot-freq-interval", "10"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "progression.png") as im:  # x_19, x_10, x_0 and the final image; 2 rows
        assert (im.height, im.width) == grid_size(2, 4, 16, 16)
