"""The Inception-v3 feature extractor FID and KID are defined on: the torch-fidelity port of the TF weights,
downloaded once (or given as a file), checked against the hash in its name, loaded without running code."""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path

import torch
from torch import nn

from .errors import EvaluationError
from .files import sha256_file

INCEPTION_FEATURES = 2048  # the pool3 features FID is defined on
DEFAULT_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


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
