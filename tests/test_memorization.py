"""The memorization report: nearest neighbours against torch.cdist, thresholds, the descriptor, constructed copies
against fresh images, the data folder and its cache, nearest.png, and `evaluate --memorization` offline."""

from __future__ import annotations

import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, train_tiny_run
from PIL import Image
from typer.testing import CliRunner

import ddpmctl.evaluate as ev
from ddpmctl import descriptor
from ddpmctl import memorization as mem
from ddpmctl import memorization_io as mio
from ddpmctl.cli.main import app
from ddpmctl.data import pil_to_uint8
from ddpmctl.demo_data import draw_demo_image
from ddpmctl.errors import DataError
from ddpmctl.prepare import prepare

runner = CliRunner()


def demo(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """n demo pictures (the generator of `ddpmctl demo`), uint8 (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    return torch.stack([pil_to_uint8(draw_demo_image(rng, size)) for _ in range(n)])


def brute(queries: torch.Tensor, references: torch.Tensor, views=(), skip=None) -> tuple[torch.Tensor, ...]:
    """Nearest and second-nearest by torch.cdist in float64, a reference's distance the least over its views."""
    q = queries.flatten(1).double()
    d = torch.cdist(q, references.flatten(1).double())
    for v in views:
        d = torch.minimum(d, torch.cdist(q, v.flatten(1).double()))
    if skip is not None:
        d[torch.arange(len(skip)), skip] = float("inf")
    values, index = d.topk(2, largest=False)
    return values[:, 0], index[:, 0], values[:, 1]


# ----------------------------------------------------------------------------- nearest neighbours


@pytest.mark.parametrize("batch,chunk", [(1024, 4096), (7, 13)])
def test_nearest_matches_cdist(batch, chunk):
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn((50, 12), generator=g), torch.randn((90, 12), generator=g)
    found = mem.nearest(q, r, batch=batch, chunk=chunk)
    d1, i1, d2 = brute(q, r)
    torch.testing.assert_close(found.distance.double(), d1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.second.double(), d2, atol=1e-5, rtol=1e-5)
    assert torch.equal(found.index, i1) and not found.view.any()


def test_nearest_takes_the_nearest_view_and_a_different_second_reference():
    g = torch.Generator().manual_seed(1)
    r = torch.randint(0, 256, (40, 3, 4, 4), generator=g, dtype=torch.uint8)
    q = torch.cat([r[:5].flip(-1), torch.randint(0, 256, (20, 3, 4, 4), generator=g, dtype=torch.uint8)])
    found = mem.nearest(q, r, views=[mem.mirror], batch=6, chunk=9)
    d1, i1, d2 = brute(q.float() / 255, r.float() / 255, views=[r.flip(-1).float() / 255])
    torch.testing.assert_close(found.distance.double(), d1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found.second.double(), d2, atol=1e-4, rtol=1e-4)
    assert torch.equal(found.index, i1)
    assert found.index[:5].tolist() == list(range(5)) and found.view[:5].all()  # the mirrored copies, found mirrored
    assert (found.distance[:5] < 1e-3).all() and (found.second[:5] > 0.5).all()  # second: another image, not the mirror
    as_tensor = mem.nearest(q, r, views=[r.flip(-1)])  # a view given whole gives the same
    assert torch.equal(as_tensor.index, found.index) and torch.equal(as_tensor.view, found.view)


def test_leave_one_out_skips_each_query_itself():
    g = torch.Generator().manual_seed(2)
    r = torch.randn((30, 5), generator=g)
    loo = mem.nearest(r, r, exclude_self=True, batch=4, chunk=7)
    d1, i1, d2 = brute(r, r, skip=torch.arange(30))
    torch.testing.assert_close(loo.distance.double(), d1, atol=1e-5, rtol=1e-5)
    assert torch.equal(loo.index, i1) and (loo.index != torch.arange(30)).all()
    subset = torch.tensor([3, 11, 29])  # a subset of the references as queries, each skipping itself
    part = mem.nearest(r[subset], r, exclude=subset, chunk=8)
    torch.testing.assert_close(part.distance, loo.distance[subset])
    assert torch.equal(part.index, loo.index[subset])
    assert mem.nearest(r[:1], r[:1], exclude_self=True).distance.isinf().all()  # nothing else to compare with


def test_thresholds_and_shares():
    real = torch.arange(1, 101, dtype=torch.float32)  # 1..100
    assert mem.copy_threshold(real, 0.05) == pytest.approx(5.95)  # torch.quantile's linear interpolation
    assert mem.copy_share(torch.tensor([1.0, 5.95, 6.0, 50.0]), 5.95) == 0.25  # strictly closer
    assert mem.copy_share(torch.zeros(0), 1.0) == 0.0
    n = mem.Neighbours(torch.tensor([1.0, 1.0, 2.0]), torch.zeros(3).long(), torch.tensor([4.0, float("inf"), 2.0]))
    assert mem.ratio(n).tolist() == [0.25, 1.0, 1.0]  # no second: the ratio test says nothing
    assert mem.binomial_tail(5, 2, 0.1) == pytest.approx(1 - 0.9**5 - 5 * 0.1 * 0.9**4)
    assert mem.binomial_tail(50000, 0, 0.08) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the descriptor


def test_descriptor_is_fixed_and_finds_changed_copies():
    imgs = demo(40, 0)
    f = descriptor.describe(imgs)
    assert f.shape == (40, 64 + 128 + 6) and f.dtype == torch.float32
    torch.testing.assert_close(descriptor.describe_mirrored(imgs), descriptor.describe(imgs.flip(-1)))
    spacing = torch.cdist(f, f).fill_diagonal_(float("inf")).min(1).values.median()
    brighter = (imgs.float() * 0.9 + 15).round().clamp(0, 255).to(torch.uint8)
    assert (descriptor.describe(brighter) - f).norm(dim=1).max() < 0.2 * spacing  # brightness/contrast: nearly free
    shifted = F.pad(imgs.float(), (1, 0, 0, 0), mode="replicate")[..., :-1].to(torch.uint8)  # one pixel right
    swapped = imgs[:, [2, 0, 1]]  # every colour changed
    for changed in (brighter, shifted, swapped):  # a changed image still finds its original
        found = mem.nearest(descriptor.describe(changed), f).index
        assert (found == torch.arange(40)).sum() >= 32
    assert (mem.nearest(swapped, imgs).index == torch.arange(40)).sum() < 20  # where pixels lose most (15 of 40 found)
    big = F.interpolate(imgs.float(), size=64, mode="nearest").to(torch.uint8)  # the same pictures at 64 px
    torch.testing.assert_close(descriptor.describe(big), f, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the report on constructed samples


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, mem.TrainingReference]:
    train_images = demo(200, 0)
    return train_images, mem.build_reference(train_images)


def shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    p = F.pad(x.float(), (2, 2, 2, 2), mode="replicate")
    s = x.shape[-1]
    return p[..., 2 + dy:2 + dy + s, 2 + dx:2 + dx + s].to(torch.uint8)


def test_copies_are_flagged_and_fresh_images_are_not(reference):
    train_images, ref = reference
    g = torch.Generator().manual_seed(0)
    noisy = (train_images[48:64].float() + 6 * torch.randn((16, 3, 32, 32), generator=g)).round().clamp(0, 255)
    copies = torch.cat([train_images[:16].flip(-1), shift(train_images[16:32], 1, 0),
                        shift(train_images[32:48].flip(-1), 0, 1), noisy.to(torch.uint8)])
    check = mem.MemorizationCheck(ref, keep=8)
    check.add(copies[:40])  # in two batches, as evaluate feeds them
    check.add(copies[40:])
    copied = check.result()
    fresh = mem.check_samples(demo(64, 1), ref)
    assert copied.num_samples == 64 and copied.num_training == 200 and copied.num_real == 200
    assert copied.copy_share >= 0.8 and copied.copying, copied.line()
    assert fresh.copy_share <= 2 * fresh.real_share and not fresh.copying, fresh.line()
    assert 0.04 <= fresh.real_share <= 0.1  # two 5% thresholds, the floor
    assert copied.pixel.median < 0.5 * copied.pixel.real_median and 0.7 < fresh.pixel.median / fresh.pixel.real_median
    assert copied.pixel.ratio_share > 0.5 and fresh.pixel.ratio_share == 0 and fresh.pixel.real_ratio_share == 0
    # the closest samples, closest first (relative to each space's threshold): the exact mirrored copies,
    # each shown beside the mirror image of the training image it copies
    rel = [min(c["pixel_rms"] / copied.pixel.threshold, c["feature_distance"] / copied.features.threshold)
           for c in copied.closest]
    assert rel == sorted(rel) and all(c["sample"] < 16 for c in copied.closest)
    first = copied.closest[0]
    assert first["sample"] < 16 and first["training_index"] == first["sample"] and first["mirrored"]
    assert torch.equal(copied.pairs[0, 0], copied.pairs[0, 1])  # the sample beside the mirror image it copies
    assert copied.pairs.shape == (8, 2, 3, 32, 32) and len(copied.closest) == 8
    assert "it copies training images" in copied.line() and "it copies" not in fresh.line()
    assert set(fresh.metrics()) >= {"copy_share", "copy_floor", "nearest_pixel_ratio", "nearest_feature_ratio"}


def test_recoloured_copies_are_caught_by_the_features_not_the_pixels(reference):
    train_images, ref = reference
    swapped = train_images[:32, [2, 0, 1]]  # every colour changed, the picture the same
    result = mem.check_samples(swapped, ref)
    assert result.pixel.share < 0.2 < result.features.share


# ----------------------------------------------------------------------------- files: data folders, cache, nearest.png


def test_raw_prepared_and_packed_folders_give_the_same_reference(tmp_path, tiny_images):
    packed = tmp_path / "packed"
    prepare(tiny_images, packed, 16, pack=True, workers=1)
    cache = tmp_path / "cache"
    raw_ref, raw_cached = mio.load_reference(tiny_images, 16, cache_dir=cache, num_workers=0)
    packed_ref, _ = mio.load_reference(packed, 16, cache_dir=cache, num_workers=0)
    assert not raw_cached and raw_ref.count == 64
    torch.testing.assert_close(packed_ref.features, raw_ref.features)
    again, cached = mio.load_reference(tiny_images, 16, cache_dir=cache, num_workers=0)
    assert cached and torch.equal(again.pixels, raw_ref.pixels)
    torch.testing.assert_close(again.real["pixel"].distance, raw_ref.real["pixel"].distance)
    other_size, _ = mio.load_reference(packed, 8, cache_dir=cache, num_workers=0)  # prepared at 16: read and resized
    assert other_size.pixels.shape == (64, 3, 8, 8)


def test_large_images_are_compared_small_and_shown_full_size(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setattr(mem, "PIXEL_SIZE", 8)  # as if the 16 px images were larger than PIXEL_SIZE
    monkeypatch.setattr(mio, "PIXEL_SIZE", 8)
    ref, _ = mio.load_reference(tiny_images, 16, cache_dir=tmp_path, num_workers=0)
    assert ref.pixels.shape == (64, 3, 8, 8)
    dataset, _ = mio.training_dataset(tiny_images, 16)
    originals = torch.stack([dataset[i] for i in range(4)])
    result = mem.check_samples(originals.flip(-1), ref, keep=4)
    assert all(c["training_index"] == c["sample"] and c["mirrored"] for c in result.closest)
    assert result.pairs.shape == (4, 2, 3, 16, 16)
    for c, pair in zip(result.closest, result.pairs, strict=True):  # the training image at full size, mirrored as matched
        assert torch.equal(pair[1], originals[c["training_index"]].flip(-1))
    direct = mio.reference_for_dataset(dataset, 16)  # what the training loop builds once per run
    torch.testing.assert_close(direct.features, ref.features)
    assert torch.equal(direct.training_image(3), originals[3])


def test_a_folder_with_one_image_is_one_clear_error(tmp_path):
    (tmp_path / "one").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "one" / "a.png")
    with pytest.raises(DataError, match="needs at least 2"):
        mio.load_reference(tmp_path / "one", 16, cache_dir=tmp_path / "c", num_workers=0)


def test_nearest_png_frames_likely_copies_in_red(reference, tmp_path):
    train_images, ref = reference
    result = mem.check_samples(torch.cat([train_images[:2], demo(2, 5)]), ref, keep=4)
    out = mio.write_report(result, tmp_path / "report", extra={"step": 7})
    png = np.asarray(Image.open(out / "nearest.png"))
    scale = math.ceil(mio.MIN_TILE / 32)
    assert png.shape[0] == 4 + 32 * scale and png.shape[1] == 4 * (2 * 32 * scale + 6) + 3 * 6
    frames = [png[0, 1 + i * (2 * 32 * scale + 12)] for i in range(4)]  # the top edge of each pair's frame
    flags = [c["likely_copy"] for c in result.closest]
    assert flags[:2] == [True, True]
    assert [tuple(f) == (255, 0, 0) for f in frames] == flags
    saved = json.loads((out / "memorization.json").read_text())
    assert saved["step"] == 7 and saved["nearest_png"] == str(out / "nearest.png") and saved["num_samples"] == 4


# ----------------------------------------------------------------------------- evaluate --memorization


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("mem_run"), tiny_images)


def evaluate_args(run: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["evaluate", "--checkpoint", str(run), "--data", str(data), "--num", "6", "--sampler", "ddim",
            "--steps", "2", "--batch-size", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", *extra]


def test_evaluate_memorization_offline_skips_fid_in_one_line(tiny_run, tiny_images, tmp_path, monkeypatch):
    def no_network(*_a, **_k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    result = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--memorization",
                                              "--out", str(tmp_path / "report")))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    skipped = [line for line in lines if line.startswith("FID/KID skipped: could not download the Inception weights")]
    assert len(skipped) == 1 and "FID " not in result.output
    assert any(line.startswith("memorization: ") and "of 6 samples are likely copies" in line for line in lines)
    assert any("pixels:   nearest training image at RMS" in line for line in lines)
    assert any("ratio test" in line for line in lines)
    assert (tmp_path / "report" / "nearest.png").is_file()
    report = json.loads((tmp_path / "report" / "memorization.json").read_text())
    assert report["num_samples"] == 6 and report["num_training"] == 64 and len(report["closest"]) == 6


def test_evaluate_no_fid_never_touches_inception_and_defaults_into_the_run(tiny_run, tiny_images, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(ev, "load_inception", lambda *_a, **_k: pytest.fail("--no-fid loaded Inception"))
    result = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--memorization", "--no-fid", "--json"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fid"] is None and out["fid_skipped"] == "--no-fid" and out["memorization"]["num_samples"] == 6
    step = json.loads((tiny_run / "checkpoint_2" / "meta.json").read_text())["step"]
    assert out["report_dir"] == str(tiny_run / "evaluate" / f"step_{step}")
    assert (tiny_run / "evaluate" / f"step_{step}" / "nearest.png").is_file()
    assert out["memorization_cached"] is False
    again = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--memorization", "--no-fid", "--json"))
    assert json.loads(again.stdout.strip().splitlines()[-1])["memorization_cached"] is True


def test_evaluate_with_weights_does_both(tiny_run, tiny_images, tmp_path, monkeypatch):
    from test_evaluate import TinyFeatures

    monkeypatch.setattr(ev, "load_inception", lambda weights=None: TinyFeatures())
    result = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--memorization",
                                              "--out", str(tmp_path / "r")))
    assert result.exit_code == 0, result.output
    assert "FID  " in result.output and "KID  " in result.output and "skipped" not in result.output
    assert "memorization: " in result.output and (tmp_path / "r" / "nearest.png").is_file()


def test_no_fid_alone_and_a_named_weights_file_that_fails_are_user_errors(tiny_run, tiny_images, tmp_path):
    result = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--no-fid"))
    assert_one_line_error(result, "--no-fid leaves nothing to evaluate: add --memorization")
    named = runner.invoke(app, evaluate_args(tiny_run, tiny_images, tmp_path, "--memorization",
                                             "--inception-weights", str(tmp_path / "none.pth")))
    assert_one_line_error(named, "--inception-weights", "does not exist")  # named by the user: not skipped


def test_the_training_loops_check_leaves_the_global_rng_alone(tiny_images):
    """It runs between training steps: drawing from the global RNG would break exact resume."""
    from ddpmctl.data import build_dataset
    from ddpmctl.memorization import check_samples
    from ddpmctl.memorization_io import reference_for_dataset

    dataset, _ = build_dataset(tiny_images, 16)
    before = torch.get_rng_state()
    ref = reference_for_dataset(dataset, 16)
    check_samples(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator()), ref)
    assert torch.equal(torch.get_rng_state(), before)
