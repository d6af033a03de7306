"""FID and KID of a checkpoint's samples against a folder of images (torchmetrics' implementations).

The features of the reference folder are computed once and cached, keyed by its file list (paths,
sizes, modification times), the image size and the feature extractor's weights. The generated images
are quantised to uint8 exactly as the PNGs ``ddpmctl sample`` writes, then featurised in batches.

FID: Heusel et al. 2017, ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) on Inception-v3 pool
features (the torch-fidelity port of the TF weights everybody reports against). KID: Binkowski et
al. 2018, the unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .classes import folder_counts, proportional_labels
from .errors import DataError, DdpmctlError
from .files import atomic_path, sha256_file
from .inference import LoadedModel, SampleProgress, iter_samples
from .sampling import to_uint8

CACHE_FORMAT = 1
INCEPTION_FEATURES = 2048  # the pool3 features FID is defined on
DEFAULT_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class EvaluationError(DdpmctlError):
    """FID/KID cannot be computed (missing extractor weights or packages, too few images)."""


# ----------------------------------------------------------------------------- the feature extractor


def inception_url() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        return DEFAULT_INCEPTION_URL
    return URL_INCEPTION_V3


def inception_hash_prefix(url: str | None = None) -> str | None:
    """The start of the file's SHA-256, which torch.hub's naming puts in it (weights-...-6726825d.pth)."""
    m = _HASH_IN_NAME.search((url or inception_url()).rsplit("/", 1)[-1])
    return m.group(1) if m else None


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")


def default_inception_path() -> Path:
    """Where the Inception weights are kept after the first download: torch.hub's cache (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / inception_url().rsplit("/", 1)[-1]


def download_inception(url: str, path: Path) -> None:
    """Download the weights to ``path`` (via a temporary file), checking the SHA-256 prefix in the file name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=inception_hash_prefix(url), progress=False)
    except OSError as exc:  # URLError, HTTPError, socket errors, a full disk
        reason = getattr(exc, "reason", None) or exc
        raise EvaluationError(
            f"could not download the Inception weights for FID/KID ({reason}); no network? Download {url} "
            f"on a machine that has it and copy the file to {path}, or pass --inception-weights FILE"
        ) from None
    except RuntimeError as exc:  # torch.hub: "invalid hash value (expected ..., got ...)"
        raise EvaluationError(f"the download of {url} is damaged ({str(exc).splitlines()[0]}); try again") from None


def verified_state_dict(path: Path, url: str, given: bool = False) -> dict[str, torch.Tensor]:
    """The weights in ``path``, after checking its SHA-256 prefix and loading it with ``weights_only=True``.

    Nothing but tensors is ever unpickled: a file holding anything else is refused, not executed. ``given``:
    the user passed ``path`` (--inception-weights), so it is no damaged download of ours to delete.
    """
    expected = inception_hash_prefix(url)
    why = ""
    if expected and not sha256_file(path).startswith(expected):
        why = f"its SHA-256 does not start with {expected}"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not the weights
            state, why = None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not why and not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
            why = "it holds no state dict of tensors"
    if why and given:  # maybe a file of the user's own (another model): never suggest deleting it
        raise EvaluationError(f"--inception-weights {path} is not the Inception weights file ({why[:200]}); pass the "
                              f"file downloaded from {url}, or leave out --inception-weights to download it")
    if why:
        raise EvaluationError(f"{path} is not the Inception weights file ({why[:200]}); delete it and download {url} again")
    return state


def inception_from_state_dict(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 holding ``state_dict`` (already verified).

    torch-fidelity only loads weights itself (a download, or a full unpickling ``torch.load`` of a path),
    so while the module is built its loader is pointed at the verified state dict: nothing is downloaded
    or unpickled there.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fx
    from torchmetrics.image.fid import NoTrainInceptionV3

    if not hasattr(fx, "load_state_dict_from_url"):
        raise EvaluationError("this torch-fidelity version loads its Inception weights in a way ddpmctl does not "
                              "know; install torch-fidelity 0.3 or 0.4")
    served: list[str] = []

    def serve(url: str, *_args: object, **_kwargs: object) -> dict[str, torch.Tensor]:
        served.append(url)
        return state_dict

    original = fx.load_state_dict_from_url
    fx.load_state_dict_from_url = serve
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)])
    finally:
        fx.load_state_dict_from_url = original
    if not served:
        raise EvaluationError("this torch-fidelity version did not take the verified Inception weights; "
                              "install torch-fidelity 0.3 or 0.4")
    return net


def load_inception(weights: str | Path | None = None) -> nn.Module:
    """torchmetrics' Inception-v3 (uint8 (B, 3, H, W) -> (B, 2048)); downloads the weights on first use.

    ddpmctl downloads the file itself (SHA-256 checked) into torch.hub's cache, loads it with
    ``weights_only=True`` and hands the tensors to the module. Without network and without the weights
    file, raises EvaluationError saying where to put the file.
    """
    try:
        import torch_fidelity  # noqa: F401 - NoTrainInceptionV3 needs it
        import torchmetrics.image.fid  # noqa: F401
    except ImportError:
        raise EvaluationError("evaluate needs torchmetrics and torch-fidelity: pip install 'ddpmctl[eval]'") from None
    url = inception_url()
    path = Path(weights).expanduser() if weights else default_inception_path()
    if weights and not path.is_file():
        raise EvaluationError(f"--inception-weights {path} does not exist; it is the file {url}")
    if not path.is_file():
        download_inception(url, path)
    return inception_from_state_dict(verified_state_dict(path, url, given=bool(weights)))


def extractor_id(extractor: nn.Module) -> str:
    """Identifies a feature extractor for the cache key: its class and a digest of its weights."""
    h = hashlib.sha256(type(extractor).__qualname__.encode())
    for name, tensor in extractor.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(extractor).__qualname__}:{h.hexdigest()[:16]}"


def num_features(extractor: nn.Module) -> int:
    n = getattr(extractor, "num_features", None)
    if isinstance(n, int):
        return n
    with torch.no_grad():
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
        return int(extractor(torch.zeros((1, 3, 32, 32), dtype=torch.uint8, device=device)).shape[-1])


@torch.no_grad()
def featurise(extractor: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) images -> float32 (B, F) features on the CPU."""
    return extractor(images.to(device)).reshape(images.shape[0], -1).float().cpu()


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
    fid: float
    kid_mean: float
    kid_std: float
    kid_subset_size: int
    num_generated: int
    num_reference: int
    checkpoint: str
    step: int
    ema: bool
    sampler: str
    steps: int | None
    seed: int
    feature_extractor: str
    reference_cache: str
    reference_cached: bool
    seconds: float

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
    labels: Sequence[int] | None = None,
    guidance: float | None = None,
) -> EvalResult:
    """Generate ``num`` images from ``loaded`` and score them against ``data_dir`` (FID, KID).

    ``extractor`` defaults to torchmetrics' Inception-v3 (loaded first, so a missing weights file
    fails before any sampling); any module mapping uint8 (B, 3, H, W) to (B, F) works. A class-conditional
    model draws classes ``labels`` (default: in proportion to ``data_dir``'s class folders, else in turn)
    with classifier-free guidance ``guidance`` (inference.iter_samples).
    """
    names = loaded.config.model.class_names
    if names and labels is None:
        labels = proportional_labels(folder_counts(Path(data_dir), names), num)
    if num < 2:
        raise EvaluationError("--num must be at least 2 for FID and KID")
    started = time.perf_counter()
    if extractor is None:
        extractor = load_inception(inception_weights)
    extractor = extractor.to(loaded.device).eval()
    ident = extractor_id(extractor)
    ref = reference_features(data_dir, loaded.config.model.img_size, extractor, loaded.device,
                             batch_size=batch_size, cache_dir=cache_dir, on_progress=on_reference, extractor_key=ident)
    chunks = []
    for batch in iter_samples(loaded, num, sampler, steps, eta, seed, batch_size, on_progress=on_sample, labels=labels,
                              guidance=guidance):
        chunks.append(featurise(extractor, to_uint8(batch.images), loaded.device))
    fake = torch.cat(chunks)
    scores = fid_kid(ref.features, fake, seed=seed)
    return EvalResult(
        fid=scores["fid"], kid_mean=scores["kid_mean"], kid_std=scores["kid_std"],
        kid_subset_size=scores["kid_subset_size"], num_generated=fake.shape[0], num_reference=ref.features.shape[0],
        checkpoint=str(loaded.checkpoint), step=loaded.step, ema=loaded.ema, sampler=sampler,
        steps=None if sampler == "ddpm" else steps, seed=seed, feature_extractor=ident,
        reference_cache=str(ref.path), reference_cached=ref.cached, seconds=time.perf_counter() - started,
    )
