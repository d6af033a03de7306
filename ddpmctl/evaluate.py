"""FID and KID of a checkpoint's samples against a folder of images (torchmetrics' implementations), and the
memorization report (memorization.py) on the same samples.

The features of the reference folder are computed once and cached, keyed by its file list (paths,
sizes, modification times), the image size and the feature extractor's weights. The generated images
are quantised to uint8 exactly as the PNGs ``ddpmctl sample`` writes, then featurised in batches.

FID: Heusel et al. 2017, ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) on Inception-v3 pool
features (the torch-fidelity port of the TF weights everybody reports against). KID: Binkowski et
al. 2018, the unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .classes import folder_counts, proportional_labels
from .errors import DataError, EvaluationError
from .files import atomic_path
from .inception import extractor_id, featurise, load_inception
from .inference import LoadedModel, SampleProgress, iter_samples
from .memorization import MemorizationCheck
from .memorization_io import load_reference, report_dir, write_report
from .sampling import to_uint8

CACHE_FORMAT = 1

# ----------------------------------------------------------------------------- reference statistics


def default_cache_dir() -> Path:
    root = os.environ.get("DDPMCTL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ddpmctl")
    return Path(root).expanduser() / "reference-features"


def reference_key(files: list[Path], root: Path, img_size: int, extractor: str) -> str:
    """Digest of what the reference features depend on: the files (path, size, mtime), size, extractor."""
    listing = []
    for f in files:
        st = f.stat()
        listing.append([str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"format": CACHE_FORMAT, "img_size": img_size, "extractor": extractor, "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class ReferenceFeatures:
    features: torch.Tensor  # (N, F) float32
    path: Path  # the cache file
    cached: bool  # read from the cache rather than computed now


def reference_features(
    data_dir: str | Path,
    img_size: int,
    extractor: nn.Module,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    num_workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    extractor_key: str | None = None,
) -> ReferenceFeatures:
    """Features of every image under ``data_dir`` (centre-cropped and resized to ``img_size``), cached."""
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    from .data import ImageFolderDataset

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {root} is not a folder of images")
    dataset = ImageFolderDataset(root, img_size)
    if len(dataset) < 2:
        raise DataError(f"--data {root} holds {len(dataset)} image{'' if len(dataset) == 1 else 's'}; FID and KID "
                        "need at least 2")
    key = reference_key(list(dataset.files), root, img_size, extractor_key or extractor_id(extractor))
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / f"{key}.safetensors"
    if path.is_file():
        try:
            return ReferenceFeatures(load_file(path)["features"], path, True)
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    chunks, done = [], 0
    for batch in loader:
        chunks.append(featurise(extractor, batch, device))
        done += batch.shape[0]
        if on_progress is not None:
            on_progress(done, len(dataset))
    features = torch.cat(chunks)
    with atomic_path(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp),
                  metadata={"data_dir": str(root.resolve()), "img_size": str(img_size), "count": str(len(features))})
    return ReferenceFeatures(features, path, False)


# ----------------------------------------------------------------------------- the metrics


class _Precomputed(nn.Module):
    """Feeds features we already extracted straight into torchmetrics (its 'feature extractor' is identity)."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
            seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over ``subsets`` random subsets) between two (N, F) feature sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 images on each side (got {real.shape[0]} reference, "
                              f"{fake.shape[0]} generated)")
    identity = _Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=identity, reset_real_features=False)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID will save all extracted features in buffer"
        kid = KernelInceptionDistance(feature=identity, subsets=subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": size}


@dataclass
class EvalResult:
    num_generated: int
    checkpoint: str
    step: int
    ema: bool
    sampler: str
    steps: int | None
    seed: int
    seconds: float
    fid: float | None = None  # FID and KID: None when skipped (fid_skipped says why)
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_subset_size: int | None = None
    num_reference: int | None = None
    feature_extractor: str | None = None
    reference_cache: str | None = None
    reference_cached: bool | None = None
    fid_skipped: str | None = None  # why FID/KID were not computed
    memorization: dict | None = None  # memorization.MemorizationResult.to_dict(), with --memorization
    memorization_cached: bool | None = None  # the training images' distances came from the cache
    report_dir: str | None = None  # where nearest.png and memorization.json were written

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    loaded: LoadedModel,
    data_dir: str | Path,
    num: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    extractor: nn.Module | None = None,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    on_reference: Callable[[int, int], None] | None = None,
    on_sample: Callable[[SampleProgress], None] | None = None,
    fid: bool = True,
    memorization: bool = False,
    out_dir: str | Path | None = None,
    on_training: Callable[[int, int], None] | None = None,
    labels: Sequence[int] | None = None,
    guidance: float | None = None,
) -> EvalResult:
    """Generate ``num`` images from ``loaded`` and score them against ``data_dir`` (FID, KID).

    ``extractor`` defaults to torchmetrics' Inception-v3 (loaded first, so a missing weights file
    fails before any sampling); any module mapping uint8 (B, 3, H, W) to (B, F) works.
    ``memorization`` adds the nearest-training-image report (memorization.py), written into ``out_dir``
    (default RUN/evaluate/step_<N>); with it, FID/KID that cannot be computed (no weights and no network,
    no torchmetrics) are skipped with the reason in ``fid_skipped`` instead of failing. ``fid=False`` skips them on purpose.
    A class-conditional model draws classes ``labels`` (default: in proportion to ``data_dir``'s class folders,
    else in turn) with classifier-free guidance ``guidance`` (inference.iter_samples).
    """
    names = loaded.config.model.class_names
    if names and labels is None:
        labels = proportional_labels(folder_counts(Path(data_dir), names), num)
    if not fid and not memorization:
        raise EvaluationError("--no-fid leaves nothing to evaluate: add --memorization")
    if fid and num < 2:
        raise EvaluationError("--num must be at least 2 for FID and KID")
    started = time.perf_counter()
    skipped = None if fid else "--no-fid"
    if fid and extractor is None:
        try:
            extractor = load_inception(inception_weights)
        except EvaluationError as exc:
            if not memorization or inception_weights:  # a file the user named that fails is their error to fix
                raise
            fid, skipped = False, str(exc)
    check = None
    if memorization:  # before the FID reference: a problem with the data shows before any long work
        dev = loaded.device if loaded.device.type == "cuda" else torch.device("cpu")  # MPS: ops untested there
        mem_ref, mem_cached = load_reference(data_dir, loaded.config.model.img_size, cache_dir=cache_dir,
                                             device=dev, on_progress=on_training)
        check = MemorizationCheck(mem_ref, device=dev)
    ref = ident = None
    if fid:
        extractor = extractor.to(loaded.device).eval()
        ident = extractor_id(extractor)
        ref = reference_features(data_dir, loaded.config.model.img_size, extractor, loaded.device,
                                 batch_size=batch_size, cache_dir=cache_dir, on_progress=on_reference,
                                 extractor_key=ident)
    chunks, generated = [], 0
    for batch in iter_samples(loaded, num, sampler, steps, eta, seed, batch_size, on_progress=on_sample, labels=labels,
                              guidance=guidance):
        pixels = to_uint8(batch.images)  # what the PNGs of `ddpmctl sample` hold
        generated += pixels.shape[0]
        if fid:
            chunks.append(featurise(extractor, pixels, loaded.device))
        if check is not None:
            check.add(pixels)
    result = EvalResult(num_generated=generated, checkpoint=str(loaded.checkpoint), step=loaded.step, ema=loaded.ema,
                        sampler=sampler, steps=None if sampler == "ddpm" else steps, seed=seed, seconds=0.0,
                        fid_skipped=skipped)
    if fid and ref is not None:
        scores = fid_kid(ref.features, torch.cat(chunks), seed=seed)
        result.fid, result.kid_mean, result.kid_std = scores["fid"], scores["kid_mean"], scores["kid_std"]
        result.kid_subset_size, result.num_reference = scores["kid_subset_size"], ref.features.shape[0]
        result.feature_extractor, result.reference_cache, result.reference_cached = ident, str(ref.path), ref.cached
    if check is not None:
        report = check.result()
        out = write_report(report, out_dir or report_dir(loaded.checkpoint, loaded.step), extra={
            "checkpoint": result.checkpoint, "step": result.step, "ema": result.ema, "sampler": sampler,
            "steps": result.steps, "seed": seed})
        result.memorization, result.memorization_cached, result.report_dir = report.to_dict(), mem_cached, str(out)
    result.seconds = time.perf_counter() - started
    return result
