"""benchmarks/quality.py (and its quality_data / quality_judge modules) on tiny sizes: seconds on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl.config import apply_overrides, resolve, to_dict

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality_data  # noqa: E402
import quality_judge  # noqa: E402

_spec = importlib.util.spec_from_file_location("quality_bench", BENCH / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

SIZES = {"train": 270, "ref": 90, "val": 90}
TINY = ["--train-images", "270", "--heldout-images", "90", "--judge-epochs", "3"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny image set and judge, made by one --score-only run over 40 val images written as PNGs."""
    out = tmp_path_factory.mktemp("quality")
    val, _ = quality_data.draw_split(0, "val", 40)
    pngs = out / "pngs"
    pngs.mkdir()
    for i, pixels in enumerate(val):
        Image.fromarray(pixels.transpose(1, 2, 0)).save(pngs / f"s_{i:03d}.png")
    lines = []
    quality.log = lines.append  # the module's printer; the JSON line goes through print
    code = quality.main(["--score-only", str(pngs), "--out", str(out), *TINY])
    assert code == 0
    return out, "\n".join(lines)


def test_image_set_is_deterministic_labelled_and_cached(bench: tuple[Path, str]) -> None:
    a, la = quality_data.draw_split(5, "train", 12)
    b, lb = quality_data.draw_split(5, "train", 12)
    c, _ = quality_data.draw_split(6, "train", 12)
    assert a.shape == (12, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert la.min() >= 0 and la.max() < len(quality_data.LABELS)
    out, _ = bench
    cached = quality_data.load_or_make(out, 0, SIZES)
    assert not cached.generated
    assert {k: len(v) for k, v in cached.labels.items()} == SIZES
    first, first_labels = quality_data.draw_split(0, "train", 5)
    assert np.array_equal(cached.images["train"][:5], first) and np.array_equal(cached.labels["train"][:5], first_labels)
    pngs = sorted(cached.path("train").glob("*.png"))
    assert len(pngs) == SIZES["train"] and pngs[0].name == f"00000_{quality_data.LABELS[first_labels[0]]}.png"
    assert np.array_equal(quality_data.read_png_folder(cached.path("train"))[:5], first)  # lossless PNGs


def test_frechet_distance_matches_the_closed_form() -> None:
    """Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, by hand: 1 + 4 + (1 - 2)^2 + (3 - 1)^2."""
    mu1, mu2 = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    s1, s2 = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64)), torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert quality_judge.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(10.0)
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)  # the same pair rotated: FD unchanged
    assert quality_judge.frechet_distance(rot @ mu1, rot @ s1 @ rot.T, rot @ mu2, rot @ s2 @ rot.T) == pytest.approx(10.0)


def test_scores_order_real_noise_and_copies(bench: tuple[Path, str]) -> None:
    out, _ = bench
    images = quality_data.load_or_make(out, 0, SIZES)
    judge, trained = quality_judge.load_or_train(images.root, images.images["train"], images.labels["train"],
                                                 len(quality_data.LABELS), 0, epochs=3)
    assert not trained  # cached by the fixture's run
    ref = quality_judge.build_reference(judge, images.images["train"], images.images["ref"], images.labels["ref"])
    real = quality_judge.score(images.images["val"][:64], ref)
    noise = quality_judge.score(quality_judge.noise_images(64, 1), ref)
    copies = quality_judge.score(images.images["train"][:64].copy()[..., ::-1].copy(), ref)  # mirrored copies
    assert real["fd"] < noise["fd"] / 3
    assert real["coverage_tv"] < noise["coverage_tv"]
    # Mode dropping: only the ref images of the judge's most frequent label on ref.
    _, probs = quality_judge.judge_outputs(judge, torch.from_numpy(images.images["ref"]))
    pred = probs.argmax(1)
    one_kind = images.images["ref"][(pred == pred.mode().values).numpy()]
    assert quality_judge.score(images.images["ref"], ref)["coverage_tv"] == pytest.approx(0.0)
    assert quality_judge.score(one_kind, ref)["coverage_tv"] == pytest.approx(1 - float(ref.histogram.max()))
    assert 1 - float(ref.histogram.max()) > 0.1  # the tiny judge does tell some kinds apart
    assert copies["memorization"] == 1.0 and real["memorization"] < 0.2 and noise["memorization"] == 0.0


def test_score_only_prints_the_table_and_a_json_last_line(bench: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    out, text = bench
    assert "held-out accuracy" in text and "floor (real)" in text and "ceiling (noise)" in text
    quality.log = lambda _t: None
    assert quality.main(["--score-only", str(out / "pngs"), "--out", str(out), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"]["num"] == 40
    assert set(summary["scores"]) == set(summary["floor"]) == set(summary["ceiling"]) == set(quality_judge.BETTER)
    assert summary["scores"]["fd"] < summary["ceiling"]["fd"]


def test_recipe_run_trains_samples_and_scores(bench: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    """A whole --images run on a tiny model: ddpmctl's train / load_model / generate through the harness."""
    out, _ = bench
    quality.log = lambda _t: None
    tiny = ["starting_channels=8", "channel_multipliers=1,2", "attention_resolutions=16", "num_heads=2",
            "bottleneck_blocks=1", "num_diffusion_timesteps=20", "sampling_steps=2", "batch_size=8", "log_interval=1",
            "precision=fp32"]
    argv = ["--recipe", "seed", "--images", "16", "--num", "8", "--steps", "2", "--out", str(out), *TINY]
    assert quality.main(argv + [a for s in tiny for a in ("--set", s)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget"]["images"] == 16 and summary["budget"]["steps"] == 2
    assert summary["options"]["prediction_type"] == "epsilon" and summary["samples"]["num"] == 8
    assert len(list(Path(summary["samples"]["folder"]).glob("sample_*.png"))) == 8


@pytest.mark.parametrize("argv, needle", [
    (["--set", "seed=3", "--images", "10"], "--set seed: the benchmark sets it"),
    (["--set", "no_such_option=1", "--images", "10"], "unknown option 'no_such_option'"),
    (["--recipe", "nope", "--images", "10"], "unknown recipe 'nope'"),
    (["--recipe", "demo"], "give a budget"),
])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         argv: list[str], needle: str) -> None:
    assert quality.main([*argv, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and needle in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing drawn, nothing trained


def test_the_house_recipe_is_the_demo_preset():
    """The adopted recipe laid over the benchmark's frozen preset is configs/demo_cpu.yaml, option for option."""
    house = to_dict(apply_overrides(resolve(quality.PRESET, {}), quality.RECIPES["house"]))
    demo = to_dict(resolve(BENCH.parent / "configs" / "demo_cpu.yaml", {}))
    for cfg in (house, demo):
        del cfg["training"]["ema_decay"]  # inert beside ema_halflife_images
    assert house == demo
