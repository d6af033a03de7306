"""ddpmctl: train Denoising Diffusion Probabilistic Models (Ho et al. 2020) on your own images.

The library never prints; the ``ddpmctl`` command renders its events. Public surface::

    from ddpmctl import Config, UNet, Schedule, train, sample
"""

__version__ = "0.1.0"

from .config import Config, load_yaml, resolve  # noqa: E402


def __getattr__(name: str):
    """``Schedule`` and ``UNet`` on first use: ``import ddpmctl`` (every command's start) does not wait for torch."""
    if name == "Schedule":
        from .diffusion import Schedule

        return Schedule
    if name == "UNet":
        from .model import UNet

        return UNet
    raise AttributeError(f"module 'ddpmctl' has no attribute {name!r}")


def train(*args, **kwargs):
    """Run training (see :func:`ddpmctl.engine.train`); imported lazily to keep ``import ddpmctl`` light."""
    from .engine import train as _train

    return _train(*args, **kwargs)


def sample(*args, **kwargs):
    """Denoise noise into images (see :func:`ddpmctl.sampling.sample`)."""
    from .sampling import sample as _sample

    return _sample(*args, **kwargs)


__all__ = ["Config", "Schedule", "UNet", "__version__", "load_yaml", "resolve", "sample", "train"]
