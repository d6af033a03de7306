"""Class-conditional training, classifier-free guidance and non-leaking augmentation (issue 17).

The quality test trains a tiny conditional model on 8 px discs and squares for 200 steps on the CPU: enough
for the class to show, and for guidance to make it show more clearly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_one_line_error, tiny_args
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddpmctl import checkpoints as ck
from ddpmctl import config as config_mod
from ddpmctl import diffusion
from ddpmctl.augment import AUGMENT_DIM, augment
from ddpmctl.classes import class_folders, class_index, proportional_labels
from ddpmctl.cli.main import app
from ddpmctl.config import DiffusionConfig, ModelConfig
from ddpmctl.data import BatchStream, build_dataset
from ddpmctl.demo_data import make_demo_dataset
from ddpmctl.engine import StepStats, StopFlag, train
from ddpmctl.errors import ConfigError, DataError, TrainingStopped
from ddpmctl.inference import generate, iter_samples, load_model
from ddpmctl.labeled import LabeledDataset
from ddpmctl.model import UNet
from ddpmctl.prepare import prepare
from ddpmctl.sampling import guided

runner = CliRunner()
SIZE = 8  # the quality test's images: a disc or a square, white on black



def draw_shapes(root: Path, count: int = 64) -> Path:
    """``count`` images in discs/ and squares/: the same shape, centred, in random bright colours."""
    rng = np.random.default_rng(0)
    lo, hi = SIZE // 6 * 4, (SIZE - SIZE // 6) * 4 - 1  # drawn 4x larger, then box-filtered down
    for i in range(count):
        im = Image.new("RGB", (SIZE * 4, SIZE * 4), tuple(int(c) for c in rng.integers(0, 40, 3)))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if i % 2 == 0 else draw.rectangle)([lo, lo, hi, hi], fill=tuple(int(c) for c in rng.integers(160, 256, 3)))
        (root / ("discs", "squares")[i % 2]).mkdir(parents=True, exist_ok=True)
        im.resize((SIZE, SIZE), Image.Resampling.BOX).save(root / ("discs", "squares")[i % 2] / f"{i:03d}.png")
    return root


def squareness(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, 8, 8) in [-1, 1] -> (N,): > 0 when the corners of the shape's box are as bright as its centre
    (a square), < 0 when they are as dark as the border (a disc)."""
    g = x.mean(1)
    lo, hi = SIZE // 6, SIZE - SIZE // 6 - 1
    corners = torch.stack([g[:, lo, lo], g[:, lo, hi], g[:, hi, lo], g[:, hi, hi]], 1).mean(1)
    centre = g[:, SIZE // 2 - 1:SIZE // 2 + 1, SIZE // 2 - 1:SIZE // 2 + 1].mean((1, 2))
    border = torch.cat([g[:, 0], g[:, -1]], 1).mean(1)
    return corners - (centre + border) / 2


def run_options(data: Path, work: Path, name: str, steps: int, **extra: object) -> dict[str, object]:
    opts: dict[str, object] = {
        "experiment_name": name, "path_to_data": str(data), "working_directory": str(work / "w"),
        "generated_directory": str(work / "g"), "img_size": SIZE, "starting_channels": 16, "norm_groups": 4,
        "channel_multipliers": "1,2", "attention_resolutions": "4", "num_heads": 2, "bottleneck_blocks": 1,
        "num_diffusion_timesteps": 100, "num_training_steps": steps, "batch_size": 16, "warmup_steps": 20,
        "learning_rate": 2e-3, "ema_decay": 0.99, "evaluation_interval": steps, "num_workers": 0,
        "sampler": "ddim", "sampling_steps": 10, "plot_freq_interval": 20, "log_interval": 10, "device": "cpu",
        "seed": 0,
    }
    return {**opts, **extra}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional run on the raw class folders: 200 steps (about 10 s on one core)."""
    work = tmp_path_factory.mktemp("conditional")
    torch.set_num_threads(1)
    train(config_mod.resolve(None, run_options(shapes, work, "shapes", 200)))
    return work / "w" / "shapes"


# ----------------------------------------------------------------------------- the classes are learned


def test_class_samples_are_recognised_and_guidance_makes_them_more_so(trained: Path) -> None:
    loaded = load_model(trained, device="cpu")
    assert loaded.config.model.class_names == ("discs", "squares")
    n = 24
    accuracy, margin = {}, {}
    for w in (0.0, 3.0):
        scores = [squareness(torch.cat([b.images for b in iter_samples(loaded, n, "ddim", 10, seed=1,
                                                                          labels=[k] * n, guidance=w)]))
                  for k in (0, 1)]
        signed = torch.cat([-scores[0], scores[1]])  # positive: recognised as the class asked for
        accuracy[w], margin[w] = (signed > 0).float().mean().item(), signed.mean().item()
    assert accuracy[3.0] >= 0.8, accuracy  # a clear majority
    assert accuracy[3.0] >= accuracy[0.0] and margin[3.0] > margin[0.0], (accuracy, margin)


def test_a_grid_of_a_conditional_model_has_one_row_per_class(trained: Path, tmp_path: Path) -> None:
    loaded = load_model(trained, device="cpu")
    res = generate(loaded, tmp_path / "out", 5, sampler="ddim", steps=3, grid=True, contact_sheet=True)
    with Image.open(res.sheet) as sheet, Image.open(res.grid) as grid:
        assert sheet.size == (3 * SIZE + 2 * 2, 2 * SIZE + 2)  # 2 rows (classes) of up to 3 images
        assert grid.size[1] == 2 * SIZE + 2  # progression: a row per class
    grid_png = next((trained.parents[1] / "g" / "shapes").glob("step_*.png"))
    with Image.open(grid_png) as training_grid:
        assert training_grid.size[1] == 2 * SIZE + 2  # the training grid too


def test_sample_cli_names_classes_and_refuses_unknown_ones(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "squares"
    result = runner.invoke(app, ["sample", "--checkpoint", str(trained), "--out", str(out), "--num", "2",
                                 "--class", "squares", "--guidance-scale", "2", "--steps", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "class squares, guidance 2" in " ".join(result.output.split()) and len(list(out.glob("sample_*.png"))) == 2
    assert runner.invoke(app, ["sample", "--checkpoint", str(trained), "--out", str(tmp_path / "one"), "--num", "1",
                               "--class", "1", "--steps", "2", "--device", "cpu"]).exit_code == 0
    assert_one_line_error(runner.invoke(app, ["sample", "--checkpoint", str(trained), "--out", str(tmp_path / "x"),
                                              "--class", "cats"]),
                          "unknown class 'cats': this model's classes are 0 discs, 1 squares")


def test_class_names_and_indices() -> None:
    assert class_folders(["a/1.png", "b/2.png", "b/c/3.png"]) == ("a", "b")
    assert class_folders(["a/1.png", "loose.png"]) == ()  # a loose image: no classes
    assert class_folders(["only/1.png", "only/2.png"]) == ()  # one folder is no choice
    assert class_index(("cats", "dogs"), "dogs") == 1 and class_index(("cats", "dogs"), "0") == 0
    for bad in ("2", "-1", "birds"):
        with pytest.raises(ConfigError, match="unknown class"):
            class_index(("cats", "dogs"), bad)
    with pytest.raises(ConfigError, match="trained without classes"):
        class_index((), "cats")
    assert proportional_labels([30, 10], 8) == [0] * 6 + [1] * 2 and proportional_labels([0, 0], 4) is None


# ----------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_guidance_is_the_same_on_eps_whatever_the_model_predicts(prediction: str) -> None:
    """(1 + w) eps_c - w eps_u: combining v (or x_0) outputs with the same weights gives exactly that eps."""
    sched = diffusion.Schedule(DiffusionConfig(num_diffusion_timesteps=50, prediction_type=prediction))
    g = torch.Generator().manual_seed(0)
    x0_c, x0_u, x_t = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 40])
    a, s = diffusion._at(sched.sqrt_abar, t), diffusion._at(sched.sqrt_one_minus_abar, t)
    eps = {1: (x_t - a * x0_c) / s, -1: (x_t - a * x0_u) / s}  # what each class's network output implies

    def net(x: torch.Tensor, tt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        e = torch.where(labels.view(-1, 1, 1, 1) >= 0, eps[1].repeat(2, 1, 1, 1)[: len(x)], eps[-1].repeat(2, 1, 1, 1)[: len(x)])
        return e if prediction == "epsilon" else (e - s.repeat(len(x) // 2, 1, 1, 1) * x) / a.repeat(len(x) // 2, 1, 1, 1)

    w = 2.5
    out = guided(net, torch.tensor([0, 0]), w)(x_t, t)
    _, eps_hat = diffusion.split_prediction(sched, x_t, t, out)
    torch.testing.assert_close(eps_hat, (1 + w) * eps[1] - w * eps[-1], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the network


def test_an_unconditional_network_is_unchanged_and_a_conditional_one_uses_its_labels() -> None:
    base = dict(img_size=8, starting_channels=16, channel_multipliers=(1, 2), attention_resolutions=(4,), num_heads=2,
                bottleneck_blocks=1, norm_groups=4)
    torch.manual_seed(0)
    plain = UNet(ModelConfig(**base))
    assert not any(k.startswith(("class_embedding", "augment_embedding")) for k in plain.state_dict())
    torch.manual_seed(0)
    cond = UNet(ModelConfig(**base, class_names=("a", "b"), augment_dim=AUGMENT_DIM))
    extra = {k for k in cond.state_dict() if k not in plain.state_dict()}
    assert extra == {"class_embedding.weight", "augment_embedding.weight"}
    for k, v in plain.state_dict().items():  # the conditioning layers come last: the rest starts the same
        assert torch.equal(v, cond.state_dict()[k]), k
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 17])
    with torch.no_grad():
        a, b, none = cond(x, t, torch.tensor([0, 0])), cond(x, t, torch.tensor([1, 1])), cond(x, t)
        assert (a - b).abs().mean() > 1e-3
        assert torch.equal(none, cond(x, t, torch.tensor([-1, -1])))  # no labels: the "no class" embedding
        assert torch.equal(none, cond(x, t, None, torch.zeros(2, AUGMENT_DIM)))  # zeros: not augmented


def test_augmentation_is_labelled_and_off_at_zero() -> None:
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    same, labels = augment(x, 0.0)
    assert torch.equal(same, x) and not labels.any()
    torch.manual_seed(1)
    out, labels = augment(x, 1.0)
    assert labels.shape == (64, AUGMENT_DIM) and (labels[:, 3:] != 0).any(1).float().mean() > 0.9
    torch.manual_seed(1)
    assert torch.equal(augment(x, 1.0)[0], out)  # drawn from the torch generator: repeatable
    # Geometry alone: a shift moves pixels by the labelled amount (mirrored at the border), a rotation is one.
    x = torch.rand(2048, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    out, labels = augment(x, 0.5)
    shifted = rotated = 0
    for i, label in enumerate(labels):
        if label[[0, 1, 2, 5, 6]].any() or not label[3:5].any():
            if label[1:3].any() and not label[[0, 3, 4, 5, 6]].any():
                rotated += any(torch.equal(out[i], torch.rot90(x[i], r, (1, 2))) for r in (1, 2, 3))
            continue
        tx, ty = (int(round(v * 16 * 0.125)) for v in label[3:5].tolist())
        cols, rows = (15 - (15 - (torch.arange(16) - d) % 30).abs() for d in (tx, ty))
        torch.testing.assert_close(out[i], x[i][:, rows][:, :, cols], rtol=0, atol=0)
        shifted += 1
    rotation_only = int((labels[:, 1:3].any(1) & ~labels[:, [0, 3, 4, 5, 6]].any(1)).sum())
    assert shifted > 10 and rotated == rotation_only > 10


# ----------------------------------------------------------------------------- data


def test_labels_survive_prepare_and_pack(tmp_path: Path) -> None:
    src = make_demo_dataset(tmp_path / "src", num_images=12, size=8, classes=3)
    assert sorted(p.name for p in src.iterdir()) == ["discs", "squares", "triangles"]
    result = prepare(src, tmp_path / "prep", 8, workers=1, pack=True)
    assert result.classes == "3 classes: discs (4), squares (4), triangles (4)"
    assert json.loads((tmp_path / "prep" / "manifest.json").read_text())["classes"] == ["discs", "squares", "triangles"]
    dataset, _ = build_dataset(tmp_path / "prep", 8)
    assert isinstance(dataset, LabeledDataset) and dataset.class_names == ("discs", "squares", "triangles")
    images, labels = next(BatchStream(dataset, 12, 0, False))
    raw = {np.asarray(Image.open(p)).tobytes(): ["discs", "squares", "triangles"].index(p.parent.name)
           for p in src.rglob("*.png")}
    assert [raw[im.permute(1, 2, 0).numpy().tobytes()] for im in images] == labels.tolist()
    # A manifest written before classes existed is read the same way; --classes none records none.
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    del manifest["classes"]
    (tmp_path / "prep" / "manifest.json").write_text(json.dumps(manifest))
    assert build_dataset(tmp_path / "prep", 8)[0].class_names == ("discs", "squares", "triangles")
    prepare(src, tmp_path / "prep", 8, workers=1, classes="none")
    assert not isinstance(build_dataset(tmp_path / "prep", 8)[0], LabeledDataset)
    with pytest.raises(DataError, match="trained on the classes discs, squares"):
        build_dataset(tmp_path / "prep", 8, ("discs", "squares"))


# ----------------------------------------------------------------------------- runs


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in (ck.MODEL, ck.EMA) for k, v in load_file(str(checkpoint / name)).items()}


def test_an_augmented_class_conditional_run_resumes_exactly(tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "data", num_images=10, size=8, classes=2)
    opts = run_options(data, tmp_path, "straight", 6, batch_size=4, augment=0.5, log_interval=1,
                       evaluation_interval=3, sampling_steps=2, num_keep_checkpoints=3)
    train(config_mod.resolve(None, opts))
    saved = yaml.safe_load((tmp_path / "w" / "straight" / "config.yaml").read_text())["model"]
    assert saved["augment_dim"] == AUGMENT_DIM and saved["class_names"] == ["discs", "squares"]
    stop = StopFlag()

    def on_event(event: object) -> None:
        if isinstance(event, StepStats) and event.step == 4:
            stop.request("test")

    split = {**opts, "experiment_name": "split"}
    with pytest.raises(TrainingStopped):
        train(config_mod.resolve(None, split), on_event, stop)
    train(config_mod.resolve(None, {**split, "resume_from_checkpoint": "latest"}))
    a, b = _weights(tmp_path / "w" / "straight" / "checkpoint_6"), _weights(tmp_path / "w" / "split" / "checkpoint_6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A network built without augmentation inputs refuses --augment on resuming, in one line.
    plain = run_options(data, tmp_path, "plain", 2, batch_size=4, sampling_steps=2, classes="none")
    train(config_mod.resolve(None, plain))
    resumed = runner.invoke(app, ["resume", "--experiment-name", "plain", "--working-directory", str(tmp_path / "w"),
                                  "--num-training-steps", "3", "--augment", "0.2"])
    assert_one_line_error(resumed, "--augment needs a network with augmentation inputs")


def test_old_unconditional_runs_load_sample_and_resume_as_before(tmp_path: Path) -> None:
    """A run saved before classes existed stays unconditional, even resumed on data that now has class folders."""
    flat = make_demo_dataset(tmp_path / "flat", num_images=16, size=16)
    assert runner.invoke(app, ["train", *tiny_args(flat, tmp_path, steps=2)]).exit_code == 0
    run = tmp_path / "working" / "tiny"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    meta = json.loads((run / "checkpoint_2" / ck.META).read_text())
    for cfg in (saved, meta["config"]):  # as written before these options existed
        for key in ("class_names", "augment_dim"):
            del cfg["model"][key]
        for key in ("classes", "augment"):
            del cfg["data"][key]
        del cfg["training"]["class_dropout"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (run / "checkpoint_2" / ck.META).write_text(json.dumps(meta))
    loaded = load_model(run, device="cpu")
    assert loaded.config.model.class_names == () and loaded.model.class_embedding is None
    out = tmp_path / "samples"
    assert runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(out), "--num", "2", "--steps", "2",
                               "--device", "cpu"]).exit_code == 0
    assert_one_line_error(runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "c"),
                                              "--class", "discs"]),
                          "--class needs a class-conditional model", "was trained without classes")
    classy = make_demo_dataset(tmp_path / "classy", num_images=16, size=16, classes=2)
    result = runner.invoke(app, ["resume", "--experiment-name", "tiny", "--working-directory", str(tmp_path / "working"),
                                 "--num-training-steps", "3", "--path-to-data", str(classy)])
    assert result.exit_code == 0, result.output
    assert "classes" not in result.output
    assert json.loads((run / "checkpoint_3" / ck.META).read_text())["config"]["model"]["class_names"] == []


def test_small_datasets_get_dropout_and_a_recommendation(tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "data", num_images=16, size=16, classes=2)
    result = runner.invoke(app, ["train", *tiny_args(data, tmp_path, steps=1)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "dropout 0.1 (16 images, under 10,000; --dropout to change); --augment 0.12 is recommended" in text
    assert "2 classes: discs (8), squares (8) (one per folder; --classes none trains without them)" in text
    assert "the 8-channel layers normalise each channel alone" in text and "--norm-groups 2" in text
    assert yaml.safe_load((tmp_path / "working" / "tiny" / "config.yaml").read_text())["model"]["dropout"] == 0.1
    result = runner.invoke(app, ["train", *tiny_args(data, tmp_path, steps=1), "--experiment-name", "plain",
                                 "--classes", "none", "--dropout", "0"])
    assert result.exit_code == 0, result.output
    assert "classes" not in result.output and "dropout" not in result.output


def test_evaluate_draws_classes_in_proportion_to_the_reference_folders(trained: Path, shapes: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:
    from ddpmctl import evaluate as ev

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["labels"])
        return iter_samples(*args, **kwargs)

    monkeypatch.setattr(ev, "iter_samples", spy)
    class Pooled(torch.nn.Module):  # stands in for Inception: uint8 (B, 3, H, W) -> (B, 12)
        num_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)

    result = ev.evaluate(load_model(trained, device="cpu"), shapes, 6, sampler="ddim", steps=2, extractor=Pooled(),
                         cache_dir=tmp_path)
    assert result.num_generated == 6 and seen == [[0, 0, 0, 1, 1, 1]]  # 32 discs, 32 squares


def test_an_edm_class_conditional_run_samples_with_heun_and_guidance(tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "data", num_images=8, size=16, classes=2)
    assert runner.invoke(app, ["train", *tiny_args(data, tmp_path, steps=2), "--formulation", "edm",
                               "--norm-groups", "2"]).exit_code == 0
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "working" / "tiny"), "--out",
                                 str(tmp_path / "s"), "--num", "2", "--steps", "2", "--class", "discs", "--device", "cpu"])
    assert result.exit_code == 0 and "heun" in result.output, result.output
