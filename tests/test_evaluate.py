"""FID/KID: torchmetrics against a direct computation, the reference cache, and the offline path."""

from __future__ import annotations

import json
import os
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import assert_one_line_error, train_tiny_run
from typer.testing import CliRunner

import ddpmctl.evaluate as ev
import ddpmctl.inception as inc
from ddpmctl.checkpoints import sha256_file
from ddpmctl.cli.main import app
from ddpmctl.data import ImageFolderDataset
from ddpmctl.errors import EvaluationError
from ddpmctl.inference import iter_samples, load_model
from ddpmctl.sampling import to_uint8

runner = CliRunner()


class TinyFeatures(torch.nn.Module):
    """A small random conv net standing in for Inception: uint8 (B, 3, H, W) -> (B, 12)."""

    num_features = 12

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017, directly: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead ReLU features make the product singular; sqrtm still copes
        covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def kid_all(a: np.ndarray, b: np.ndarray) -> float:
    """Binkowski et al. 2018: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, one subset of everything."""
    d, m = a.shape[1], a.shape[0]
    k_aa, k_bb, k_ab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2 * k_ab.mean())


def test_fid_and_kid_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    real = torch.randn((200, 12), generator=g, dtype=torch.float64)
    fake = torch.randn((200, 12), generator=g, dtype=torch.float64) * 1.3 + 0.2
    scores = ev.fid_kid(real.float(), fake.float(), subsets=3, subset_size=1000)
    assert scores["fid"] == pytest.approx(frechet(real.float().double().numpy(), fake.float().double().numpy()),
                                          rel=1e-4)
    assert scores["kid_subset_size"] == 200  # capped at the number of images
    assert scores["kid_mean"] == pytest.approx(kid_all(real.numpy(), fake.numpy()), rel=1e-3)
    assert ev.fid_kid(real.float(), real.float(), subsets=2)["fid"] == pytest.approx(0.0, abs=1e-3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("eval_run"), tiny_images)


def test_evaluate_end_to_end_matches_direct_fid(tiny_run, tiny_images, tmp_path):
    loaded = load_model(tiny_run, device="cpu")
    net = TinyFeatures()
    result = ev.evaluate(loaded, tiny_images, 24, sampler="ddim", steps=4, seed=5, batch_size=10, extractor=net,
                         cache_dir=tmp_path / "cache")
    # The same images and features, computed by hand.
    fake = torch.cat([b.images for b in iter_samples(loaded, 24, "ddim", 4, seed=5, batch_size=10)])
    with torch.no_grad():
        f_fake = net(to_uint8(fake)).double().numpy()
        real = torch.stack([ImageFolderDataset(tiny_images, 16)[i] for i in range(64)])
        f_real = net(real).double().numpy()
    assert result.num_generated == 24 and result.num_reference == 64 and not result.reference_cached
    assert result.fid == pytest.approx(frechet(f_real, f_fake), rel=1e-3)
    assert result.fid > 0 and result.kid_subset_size == 24 and result.ema


def test_reference_features_are_cached_and_invalidated(tiny_images, tmp_path):
    data = tmp_path / "ref"
    data.mkdir()
    for p in sorted(tiny_images.glob("*.png"))[:6]:
        (data / p.name).write_bytes(p.read_bytes())
    net, cache = TinyFeatures(), tmp_path / "cache"
    first = ev.reference_features(data, 16, net, cache_dir=cache, num_workers=0)
    again = ev.reference_features(data, 16, net, cache_dir=cache, num_workers=0)
    assert not first.cached and again.cached and again.path == first.path
    torch.testing.assert_close(again.features, first.features)
    victim = sorted(data.glob("*.png"))[0]
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))  # a changed file
    changed = ev.reference_features(data, 16, net, cache_dir=cache, num_workers=0)
    assert not changed.cached and changed.path != first.path
    other_net = ev.reference_features(data, 16, TinyFeatures(seed=1), cache_dir=cache, num_workers=0)
    assert not other_net.cached and other_net.path != changed.path
    other_size = ev.reference_features(data, 8, net, cache_dir=cache, num_workers=0)
    assert not other_size.cached


def test_evaluate_cli_json(tiny_run, tiny_images, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_inception", lambda weights=None: TinyFeatures())
    args = ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tiny_images), "--num", "6", "--sampler", "ddim",
            "--steps", "3", "--batch-size", "6", "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_generated"] == 6 and out["num_reference"] == 64 and out["fid"] > 0 and out["steps"] == 3
    assert out["ema"] is True and out["reference_cached"] is False
    again = runner.invoke(app, [*args, "--no-ema"])  # the summary form; the reference now comes from the cache
    assert again.exit_code == 0, again.output
    assert "FID" in again.output and "KID" in again.output and "cached in" in again.output


def test_offline_without_weights_is_one_clear_line(tiny_run, tiny_images, tmp_path, monkeypatch):
    """No network and no weights file: exit 1, one Error line saying where the file goes, no traceback."""
    def no_network(*_a, **_k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tiny_images),
                                 "--num", "4", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "could not download the Inception weights" in result.output
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in result.output.replace(
        "\n", "")
    assert "--inception-weights" in result.output


def test_inception_weights_option_checks_the_file(tiny_run, tiny_images, tmp_path):
    missing = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tiny_images),
                                  "--inception-weights", str(tmp_path / "none.pth"), "--device", "cpu"])
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"not a checkpoint")
    bad = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tiny_images),
                              "--inception-weights", str(bogus), "--device", "cpu"])
    assert bad.exit_code == 1 and "is not the Inception weights file" in bad.output and "Traceback" not in bad.output


def test_evaluate_user_errors(tiny_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "is not a folder of images" in res.output and "Traceback" not in res.output
    with pytest.raises(Exception, match="FID and KID need at least 2"):
        ev.reference_features(empty, 16, TinyFeatures(), cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- the Inception weights, safely


def test_the_inception_file_name_carries_its_hash_prefix():
    assert inc.inception_hash_prefix() == "6726825d"
    assert inc.inception_hash_prefix("https://example.org/weights.pth") is None


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A file shaped like the real weights (random values), and its SHA-256 prefix."""
    import torch_fidelity.feature_extractor_inceptionv3 as fx

    with pytest.MonkeyPatch.context() as mp:  # build the module without any weights to copy its layout
        mp.setattr(fx, "load_state_dict_from_url", lambda *_a, **_k: {})
        mp.setattr(fx.FeatureExtractorInceptionV3, "load_state_dict", lambda *_a, **_k: None)
        net = fx.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path, sha256_file(path)[:8]


def test_inception_is_downloaded_with_its_hash_and_never_unpickled_unsafely(inception_file, tmp_path, monkeypatch):
    source, prefix = inception_file
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(inc, "inception_hash_prefix", lambda url=None: prefix)
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        Path(dst).write_bytes(source.read_bytes())

    real_load = torch.load
    loads = []

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch, "load", checked_load)
    net = inc.load_inception()
    assert downloads == [(inc.inception_url(), prefix)] and inc.default_inception_path().is_file()
    expected = real_load(source, weights_only=True)
    torch.testing.assert_close(net.state_dict()["fc.weight"], expected["fc.weight"])
    inc.load_inception()  # the second time from the cache, verified again
    assert len(downloads) == 1 and loads == [True, True]  # torch-fidelity itself never loaded anything


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("PWNED_MARKER_DIR",))


def test_a_cached_file_with_pickled_objects_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload()}, bad)
    monkeypatch.setattr(inc, "inception_hash_prefix", lambda url=None: sha256_file(bad)[:8])
    with pytest.raises(EvaluationError, match="is not the Inception weights file"):
        inc.load_inception(bad)
    assert not (tmp_path / "PWNED_MARKER_DIR").exists()


def test_a_file_with_the_wrong_hash_is_refused_before_loading(tmp_path, monkeypatch):
    wrong = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1)}, wrong)
    monkeypatch.setattr(torch, "load", lambda *_a, **_k: pytest.fail("loaded a file with the wrong hash"))
    with pytest.raises(EvaluationError, match="SHA-256 does not start with 6726825d"):
        inc.load_inception(wrong)


def test_a_wrong_file_passed_as_inception_weights_is_not_called_a_damaged_download(tiny_run, tiny_images, tmp_path):
    theirs = tmp_path / "my_own_model.pth"  # maybe precious: never suggest deleting it
    torch.save({"w": torch.zeros(1)}, theirs)
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tiny_run), "--data", str(tiny_images), "--num", "4",
                                 "--inception-weights", str(theirs), "--device", "cpu"])
    assert_one_line_error(result, f"Error: --inception-weights {theirs} is not the Inception weights file (its SHA-256 "
                                  f"does not start with 6726825d); pass the file downloaded from {inc.inception_url()}, "
                                  "or leave out --inception-weights to download it")
    assert "delete" not in result.output


def test_a_wrong_file_in_the_download_cache_is_to_be_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cached = inc.default_inception_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")
    with pytest.raises(EvaluationError, match=f"^{cached} is not the Inception weights file .*; delete it and download"):
        inc.load_inception()
