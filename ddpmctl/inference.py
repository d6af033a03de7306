"""Load a trained model from a checkpoint (its config travels inside) and generate images in batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn

from . import checkpoints
from .config import Config, from_dict
from .diffusion import Schedule, timestep_subsequence
from .errors import CheckpointError
from .runtime import Precision, build_model, resolve_precision, select_device
from .sampling import SampleResult, progression_grid, sample, to_uint8


@dataclass
class LoadedModel:
    model: nn.Module
    schedule: Schedule
    config: Config
    checkpoint: Path
    step: int
    ema: bool  # whether the EMA weights were loaded
    device: torch.device
    precision: Precision
    notes: list[str]


def locate_checkpoint(path: str | Path) -> tuple[Path, list[str]]:
    """PATH is a checkpoint folder, or a run folder whose newest usable checkpoint is used."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a checkpoint folder or a run folder")
    if (path / checkpoints.META).is_file() or checkpoints._NAME.match(path.name):
        return checkpoints.resolve_checkpoint(path.parent, str(path))
    return checkpoints.resolve_checkpoint(path, "latest")


def load_model(path: str | Path, device: str = "auto", use_ema: bool = True, precision: str = "auto") -> LoadedModel:
    """Rebuild the network from the checkpoint's own config and load its (EMA) weights."""
    ckpt, notes = locate_checkpoint(path)
    meta = checkpoints.read_meta(ckpt)
    cfg = from_dict(meta.get("config", {}), source=f"{ckpt}/meta.json")
    dev = select_device(device)
    model = build_model(cfg)
    has_ema = (ckpt / checkpoints.EMA).is_file()
    if use_ema and not has_ema:
        notes.append(f"{ckpt.name} has no EMA weights; sampling with the raw weights")
    name = checkpoints.EMA if use_ema and has_ema else checkpoints.MODEL
    try:
        model.load_state_dict(checkpoints.load_weights(ckpt, name))
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt / name} does not match its config: {str(exc).splitlines()[0]}") from None
    model = model.to(dev).eval().requires_grad_(False)
    prec = resolve_precision(precision, dev)
    return LoadedModel(model, Schedule(cfg.diffusion, dev), cfg, ckpt, int(meta["step"]),
                       use_ema and has_ema, dev, prec, notes)


def generate(
    loaded: LoadedModel,
    out_dir: str | Path,
    num: int,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    grid: bool = False,
    show_x0: bool = False,
    plot_freq_interval: int | None = None,
    contact_sheet: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``num`` PNGs (sample_00000.png, ...) into ``out_dir``.

    ``grid`` adds progression.png (noise to image, a row per sample); ``contact_sheet`` adds samples.png,
    all images (up to 256) tiled in one picture.

    Each batch's x_T and step noise come from (seed, batch index), so the same seed gives the same
    images whatever the batch size of earlier runs on this device.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = loaded.config.model.img_size
    per_step = plot_freq_interval or loaded.config.sampling.plot_freq_interval
    total_steps = len(timestep_subsequence(loaded.schedule.num_steps, None if sampler == "ddpm" else steps))
    written: list[Path] = []
    done_steps = 0
    first: SampleResult | None = None
    sheet: list[torch.Tensor] = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + start)
        noise = torch.randn((n, 3, size, size), generator=gen).to(loaded.device)
        step_gen = torch.Generator(device=loaded.device).manual_seed(seed * 1_000_003 + start + 1)

        def progress(i: int, _n: int, base: int = done_steps) -> None:
            if on_progress is not None:
                on_progress(base + i, total_steps * ((num + batch_size - 1) // batch_size))

        result = sample(
            loaded.model, loaded.schedule, noise, sampler=sampler, steps=steps, eta=eta, generator=step_gen,
            record_every=per_step if (grid and first is None) else None, max_frames=24,
            autocast=loaded.precision.autocast_factory(), callback=progress,
        )
        done_steps += total_steps
        if first is None:
            first = result
        if contact_sheet and len(sheet) < 256:
            sheet.extend(result.images[: 256 - len(sheet)])
        for i, img in enumerate(to_uint8(result.images).numpy()):
            path = out / f"sample_{start + i:05d}.png"
            Image.fromarray(img).save(path)
            written.append(path)
    if sheet:
        tiles = torch.stack(sheet)
        img = torchvision.utils.make_grid((tiles + 1) / 2, nrow=int(math.ceil(math.sqrt(len(sheet)))), padding=2,
                                          pad_value=1.0)
        path = out / "samples.png"
        Image.fromarray((img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    if grid and first is not None:
        rows = min(first.images.shape[0], 8)
        first.images = first.images[:rows]
        first.frames = [f[:rows] for f in first.frames]
        first.frames_x0 = [f[:rows] for f in first.frames_x0]
        img = progression_grid(first, show_x0)
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = out / "progression.png"
        Image.fromarray(arr).save(path)
        written.append(path)
    return written
