"""Trained weights in and out: ``ddpmctl import``, ``checkpoints export --format diffusers``, and
:func:`load_pretrained`, what ``train --init-from`` starts a run from.

Every folder is written into a temporary sibling first and renamed into place, so it is whole or absent.
Only safetensors and JSON are read from the folders of others: nothing loaded can run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__, checkpoints, rundir
from . import diffusers_format as df
from .config import (
    Config,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    apply_overrides,
    complete_saved,
    dump_yaml,
    from_dict,
    saved_model_config,
    to_dict,
    with_absolute_paths,
)
from .errors import CheckpointError
from .files import fsync_dir, fsync_file
from .layout import RUN_CONFIG, grid_name
from .model import UNet


@dataclass
class Pretrained:
    """Trained weights with the configuration that computes what they were trained for."""

    model: ModelConfig  # builds the network the weights fit: UNet(model).load_state_dict(weights)
    diffusion: DiffusionConfig  # the schedule and prediction type they were trained with
    weights: dict[str, torch.Tensor]  # ddpmctl's state-dict names, float32 on the CPU
    source: str  # where they came from, for messages and model cards
    ema: bool  # whether these are EMA weights (or weights of unknown kind: a diffusers folder)
    step: int | None = None  # the ddpmctl checkpoint's step; None for a diffusers folder
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. sampler differences)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # any failure to parse a file from disk is the file's fault, not a bug
        raise CheckpointError(f"cannot read {path}: {str(exc).strip().splitlines()[0][:200]}") from None


def check_shapes(weights: Mapping[str, torch.Tensor], m: ModelConfig, source: str) -> None:
    """Refuse weights that do not fit UNet(m) (names and shapes), in one line."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(m).state_dict().items()}
    for key, shape in expected.items():
        if key not in weights:
            raise CheckpointError(f"{source} does not fit its model config: no weight {key}")
        if tuple(weights[key].shape) != shape:
            raise CheckpointError(f"{source} does not fit its model config: {key} is "
                                  f"{tuple(weights[key].shape)}, the model needs {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise CheckpointError(f"{source} holds weights its model config does not use (e.g. {extra[0]})")


def read_diffusers(path: str | Path) -> Pretrained:
    """A diffusers UNet2DModel (or pipeline) folder as ddpmctl weights and configs; unsupported parts refused."""
    unet, sched = df.find_unet(path)
    model, flip = df.model_config_from_unet(df.read_json(unet / df.UNET_CONFIG))
    diffusion, notes = df.diffusion_config_from_scheduler(df.read_json(sched) if sched else None, str(unet))
    file = df.weights_file(unet)
    weights = df.from_diffusers(_read_safetensors(file), model, flip, str(file))
    check_shapes(weights, model, str(file))
    return Pretrained(model, diffusion, weights, str(Path(path).expanduser()), ema=False, notes=notes)


def read_checkpoint(path: str | Path) -> Pretrained:
    """A ddpmctl checkpoint (or a run folder's newest good one): EMA weights when it has them."""
    ckpt, notes = rundir.locate(path)
    meta = checkpoints.read_meta(ckpt)
    cfg = from_dict(complete_saved(meta.get("config", {})), source=f"{ckpt / checkpoints.META}")
    ema = (ckpt / checkpoints.EMA).is_file()
    if not ema:
        notes.append(f"{ckpt.name} has no EMA weights; using the raw weights")
    name = checkpoints.EMA if ema else checkpoints.MODEL
    weights = {k: v.float() for k, v in checkpoints.load_weights(ckpt, name).items()}
    check_shapes(weights, cfg.model, str(ckpt / name))
    return Pretrained(cfg.model, cfg.diffusion, weights, str(ckpt), ema, int(meta["step"]), notes)


def read_exported(path: Path) -> Pretrained:
    """A file written by ``ddpmctl checkpoints export`` (weights, model config in its metadata)."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        model = saved_model_config(json.loads(meta["model_config"]))
        diffusion = DiffusionConfig(**json.loads(meta.get("diffusion_config", "{}")))
    except KeyError:
        raise CheckpointError(f"{path} carries no ddpmctl model config in its metadata: pass the diffusers "
                              "folder it belongs to, or a file written by 'ddpmctl checkpoints export'") from None
    except Exception as exc:  # unreadable header, bad JSON, unknown keys: the file's fault
        raise CheckpointError(f"cannot read {path}: {str(exc).strip().splitlines()[0][:200]}") from None
    weights = {k: v.float() for k, v in _read_safetensors(path).items()}
    check_shapes(weights, model, str(path))
    step = meta.get("step", "")
    return Pretrained(model, diffusion, weights, str(path), meta.get("weights") == "ema",
                      int(step) if step.isdigit() else None)


def load_pretrained(path: str | Path) -> Pretrained:
    """Trained weights to start from, whatever holds them (what ``train --init-from PATH`` reads).

    ``path`` is one of: a diffusers folder (a UNet2DModel folder with config.json and
    diffusion_pytorch_model.safetensors, its scheduler_config.json beside it or in ../scheduler/, or a
    pipeline folder with unet/ and scheduler/); a ddpmctl run folder (its newest good checkpoint) or
    checkpoint folder (EMA weights preferred); or a .safetensors file from ``ddpmctl checkpoints export``.
    The returned :class:`Pretrained` holds ddpmctl weights for ``UNet(result.model)`` and the diffusion
    settings they were trained with; a fine-tuning run should take both (its own model options cannot
    change the network) and start a fresh optimizer and EMA from the weights. Unsupported or unsafe inputs
    (a pickle, an architecture ddpmctl cannot compute exactly) raise CheckpointError in one line.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".safetensors" and not (path.parent / df.UNET_CONFIG).is_file():
        return read_exported(path)
    if df.is_diffusers_folder(path) or (path.is_file() and (path.parent / df.UNET_CONFIG).is_file()):
        return read_diffusers(path)
    return read_checkpoint(path)


# A run started --init-from trained weights fine-tunes them: defaults a --config file or an option still overrides.
FINE_TUNING_DEFAULTS = {"learning_rate": 2e-5, "warmup_steps": 200}


def fine_tuning_base() -> Config:
    """The built-in defaults with FINE_TUNING_DEFAULTS laid over them (the base of an --init-from run)."""
    return apply_overrides(Config(), FINE_TUNING_DEFAULTS)


def fine_tuning_config(cfg: Config, pre: Pretrained) -> tuple[Config, list[str]]:
    """``cfg`` with the network and diffusion settings of ``pre``, which define what its weights compute.

    The loss (loss_fn, loss_weighting, min_snr_gamma) stays the run's own; a model or diffusion option set
    to something else than both the default and the weights' value is named in a note, as it is ignored.
    """
    own_loss = {k: getattr(cfg.diffusion, k) for k in ("loss_fn", "loss_weighting", "min_snr_gamma")}
    notes = []
    for section, theirs in (("model", pre.model), ("diffusion", pre.diffusion)):
        mine = getattr(cfg, section)
        default = type(mine)()
        for f in dataclasses.fields(mine):
            ours, given = getattr(mine, f.name), getattr(theirs, f.name)
            if f.name not in own_loss and ours != given and ours != getattr(default, f.name):
                notes.append(f"{f.name} {ours} ignored: the network comes from --init-from ({f.name} {given})")
    data = to_dict(cfg)
    data["model"] = dataclasses.asdict(pre.model)
    data["diffusion"] = {**dataclasses.asdict(pre.diffusion), **own_loss}
    return from_dict(data, source=f"--init-from {pre.source}"), notes


# ----------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    run_dir: Path
    checkpoint: Path
    config: Config
    parameters: int
    notes: list[str]


def _empty_or_absent(out: Path) -> bool:
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def _scratch(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to build it in."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(f"cannot create {out}: {exc.strerror or exc}") from None
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (absent, or an empty folder)."""
    if out.is_dir():
        out.rmdir()  # rename cannot replace a folder on every platform
    tmp.rename(out)
    fsync_dir(out.parent)


def import_diffusers(source: str | Path, out: str | Path) -> ImportResult:
    """Write a diffusers UNet2DModel folder as a ddpmctl run folder (config.yaml + checkpoint_0/).

    The checkpoint holds the weights as both model and EMA weights, so ``sample``, ``evaluate``,
    ``checkpoints list/export`` and ``train --init-from`` use it like any run's; its training state is
    empty (there is no optimizer to resume), so ``resume`` does not apply: fine-tune with ``--init-from``.
    """
    pre = read_diffusers(source)
    out = Path(out).expanduser().absolute()
    cfg = with_absolute_paths(Config(run=RunConfig(experiment_name=out.name, working_directory=str(out.parent)),
                                     model=pre.model, diffusion=pre.diffusion))
    if not _empty_or_absent(out):
        raise CheckpointError(f"{out} already exists and is not empty: pass a new folder as --out")
    tmp = _scratch(out)
    meta = {"ddpmctl_version": __version__, "torch_version": torch.__version__, "config": to_dict(cfg),
            "loss": None, "ema": True, "imported": {"from": pre.source, "format": "diffusers"}}
    try:
        (tmp / RUN_CONFIG).write_text(dump_yaml(cfg))
        fsync_file(tmp / RUN_CONFIG)
        checkpoints.save_checkpoint(tmp, 0, pre.weights, {"imported_from": pre.source}, meta, ema_state=pre.weights)
        _move_into_place(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(out, out / "checkpoint_0", cfg, sum(v.numel() for v in pre.weights.values()), pre.notes)


# ----------------------------------------------------------------------------- export


@dataclass
class DiffusersExport:
    source: Path  # the checkpoint folder exported
    out: Path
    weights: str  # "ema" or "model"
    step: int
    notes: list[str]


def model_card(cfg: Config, meta: dict[str, Any], weights: str, grid: str | None) -> str:
    """README.md of an exported folder: what the model is, how to load it, how it was trained."""
    t, step = cfg.training, int(meta.get("step", 0))
    data = meta.get("data_state", {})
    world = int(data.get("world_size", 1))
    imported = meta.get("imported")
    if imported:
        history = f"Weights imported from `{imported.get('from')}` ({imported.get('format')}), not trained by ddpmctl since."
    else:
        seen = step * t.batch_size * t.gradient_accumulation_steps * world
        images = f" ({data['num_images']} images)" if "num_images" in data else ""
        loss = f"; training loss {meta['loss']:.4f} at the save" if isinstance(meta.get("loss"), float) else ""
        history = (f"Trained for {step} optimizer steps, {seen:,} images seen ({t.batch_size} per batch x "
                   f"{t.gradient_accumulation_steps} accumulation x {world} process(es)), on "
                   f"`{cfg.data.path_to_data}`{images}{loss}.")
    settings = yaml.safe_dump({k: v for k, v in to_dict(cfg).items() if k in ("model", "diffusion", "training")},
                              sort_keys=False)
    picture = f"\n![denoising progression at step {step}]({grid})\n" if grid else ""
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags: [ddpm, ddpmctl, unconditional-image-generation]
---
# {cfg.run.experiment_name}

A denoising diffusion model (Ho et al. 2020) of {cfg.model.img_size}x{cfg.model.img_size} px images, exported by
ddpmctl {__version__} from `{meta.get('source', '')}` ({weights} weights, step {step}).
{picture}
## Use

```python
from diffusers import DDPMPipeline, DDIMScheduler

pipe = DDPMPipeline.from_pretrained("PATH/TO/THIS/FOLDER")
image = pipe(num_inference_steps={cfg.diffusion.num_diffusion_timesteps}).images[0]
# faster, as `ddpmctl sample --sampler ddim --steps 50`:
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
image = pipe(num_inference_steps=50).images[0]
```

## Training

{history} Trained with ddpmctl {meta.get('ddpmctl_version') or 'unknown'}; its settings (`ddpmctl train
--config FILE` reads them):

```yaml
{settings}```
"""


def export_diffusers(path: str | Path, out: str | Path, overwrite: bool = False) -> DiffusersExport:
    """Write a checkpoint's EMA (else raw) weights as a diffusers DDPMPipeline folder with a model card.

    Refused, in one line naming the option that would make it exportable, when the run's network has no
    exact UNet2DModel equivalent: the folder would load in diffusers and compute something else.
    """
    ckpt, notes = rundir.locate(path)
    meta = checkpoints.read_meta(ckpt)
    cfg = from_dict(complete_saved(meta.get("config", {})), source=f"{ckpt / checkpoints.META}")
    unet_cfg, sched_cfg = df.unet_config(cfg.model), df.scheduler_config(cfg.diffusion)  # refusals first
    ema = (ckpt / checkpoints.EMA).is_file()
    if not ema:
        notes.append(f"{ckpt.name} has no EMA weights; exported the raw weights")
    weights = df.to_diffusers(checkpoints.load_weights(ckpt, checkpoints.EMA if ema else checkpoints.MODEL), cfg.model)
    out = Path(out).expanduser().absolute()
    replace = out.is_dir() and (out / df.MODEL_INDEX).is_file()  # an earlier export: --force replaces it
    if replace and not overwrite:
        raise CheckpointError(f"{out} already holds a diffusers export: pass --force to replace it")
    if not replace and not _empty_or_absent(out):
        raise CheckpointError(f"{out} already exists and is not a diffusers export: pass a new folder as --out")
    grid = cfg.generated_dir / grid_name(int(meta["step"]))
    tmp, old = _scratch(out), out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        save_file(weights, str(tmp / "unet" / df.UNET_WEIGHTS), metadata={"format": "pt"})
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": df.FORMAT_VERSION,
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        for name, content in ((f"unet/{df.UNET_CONFIG}", unet_cfg), (f"scheduler/{df.SCHEDULER_CONFIG}", sched_cfg),
                              (df.MODEL_INDEX, index)):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if grid.is_file():
            shutil.copyfile(grid, tmp / "sample_grid.png")
        kind = "EMA" if ema else "raw (no EMA)"
        (tmp / "README.md").write_text(model_card(cfg, {**meta, "source": str(ckpt)}, kind,
                                                  "sample_grid.png" if grid.is_file() else None))
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        if replace:
            out.rename(old)
        _move_into_place(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # the replacement failed: put the earlier export back
        shutil.rmtree(old, ignore_errors=True)
    return DiffusersExport(ckpt, out, "ema" if ema else "model", int(meta["step"]), notes)
