"""The diffusers folder format of DDPM-family UNets, read and written with json and safetensors only.

Read: a UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) with its scheduler config
beside it (scheduler_config.json: the flat layout of the google/ddpm-* repositories) or in ../scheduler/;
or a pipeline folder holding unet/ and scheduler/. Written: a DDPMPipeline folder (model_index.json,
unet/, scheduler/) that diffusers' ``UNet2DModel.from_pretrained(DIR/unet)`` and
``DDPMPipeline.from_pretrained(DIR)`` load. diffusers itself is never imported.

A UNet2DModel built from DownBlock2D/AttnDownBlock2D levels (the DDPM authors' models, and what diffusers'
unconditional training example builds) is ddpmctl's UNet module for module:

    time_proj + time_embedding.linear_1/2   temb.0/2 (+ timestep_embedding: freq_shift; flip_sin_to_cos is
                                            a permutation of linear_1's input columns)
    conv_in                                 stem
    down_blocks.L.resnets.B / attentions.B  the level's Blocks in ``down`` (res / attn), then
    down_blocks.L.downsamplers.0.conv       its Downsample (downsample_padding 0: "after", 1: "both")
    mid_block resnets.0, attentions.0, .1   mid.0.res, mid.0.attn, mid.1.res (bottleneck_blocks 2)
    up_blocks.K (K = levels-1-L)            the level's Blocks in ``up``, then its Upsample
    conv_norm_out, conv_out                 out.0, out.2
    to_q | to_k | to_v (Linear)             qkv (one 1x1 conv: the three weights stacked)
    to_out.0 (Linear)                       proj (1x1 conv)

diffusers applies SiLU to the time embedding in every resnet (time_embedding_silu), divides residual sums
by output_scale_factor 1, and sets heads per layer as channels / attention_head_dim (None: one head).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import Config, DiffusionConfig, ModelConfig, validate
from .errors import CheckpointError, ConfigError
from .model import Attention, UNet, attention_resolutions

UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"
FORMAT_VERSION = "0.25.0"  # the _diffusers_version written: diffusers knows every key written here since then
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers beta_schedule -> ddpmctl's
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}  # diffusers prediction_type -> ddpmctl's

# UNet2DModel.__init__'s defaults: what diffusers assumes for a key its config.json lacks.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D", "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# Keys whose value must be exactly this for ddpmctl's network to compute the same function.
UNET_FIXED: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
    "upsample_type": "conv", "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
DOWN, ATTN_DOWN, UP, ATTN_UP = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"
RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}  # ddpmctl ResBlock -> diffusers ResnetBlock2D
ATTN_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # before diffusers 0.14


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def is_diffusers_folder(path: Path) -> bool:
    """Whether ``path`` looks like a diffusers UNet or pipeline folder."""
    return path.is_dir() and any((path / name).is_file() for name in (UNET_CONFIG, MODEL_INDEX, f"unet/{UNET_CONFIG}"))


def find_unet(path: str | Path) -> tuple[Path, Path | None]:
    """The UNet2DModel folder under ``path`` and its scheduler config file (None when there is none)."""
    path = Path(path).expanduser()
    if path.is_file() and path.name.endswith((".safetensors", ".bin", ".json")):
        path = path.parent  # e.g. DIR/diffusion_pytorch_model.safetensors: the folder is meant
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a folder: pass a diffusers model folder "
                              "(config.json + diffusion_pytorch_model.safetensors, or unet/ and scheduler/)")
    unet = path / "unet" if (path / "unet" / UNET_CONFIG).is_file() else path
    if not (unet / UNET_CONFIG).is_file():
        raise CheckpointError(f"{path} holds no {UNET_CONFIG} (nor unet/{UNET_CONFIG}): it is not a diffusers "
                              "UNet2DModel or pipeline folder")
    for candidate in (unet / SCHEDULER_CONFIG, unet.parent / "scheduler" / SCHEDULER_CONFIG):
        if candidate.is_file():
            return unet, candidate
    return unet, None


def weights_file(unet: Path) -> Path:
    """The safetensors weights of a UNet folder; a pickle (.bin) alone is refused with the command to convert it."""
    for name in (UNET_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors"):
        if (unet / name).is_file():
            return unet / name
    if (unet / "diffusion_pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{unet} holds its weights only as a pickle (diffusion_pytorch_model.bin), which can run code when "
            "loaded; ddpmctl reads safetensors only. Convert it yourself, with diffusers installed: python -c "
            f"\"from diffusers import UNet2DModel; UNet2DModel.from_pretrained('{unet}')"
            f".save_pretrained('{unet}', safe_serialization=True)\"")
    if any(unet.glob("diffusion_pytorch_model*.index.json")):
        raise CheckpointError(f"{unet} holds sharded weights; ddpmctl reads one {UNET_WEIGHTS} file")
    raise CheckpointError(f"{unet} has no {UNET_WEIGHTS}")


# ----------------------------------------------------------------------------- configurations


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"{what}; ddpmctl imports DDPM-family UNet2DModels only (DownBlock2D/AttnDownBlock2D "
                           "levels, a resnet-attention-resnet mid block)")


def model_config_from_unet(raw: Mapping[str, Any]) -> tuple[ModelConfig, bool]:
    """The ModelConfig computing what a UNet2DModel config.json describes, and its flip_sin_to_cos.

    Anything ddpmctl's UNet cannot compute exactly is refused in one line naming the unsupported part.
    """
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _refuse(f"the model is a {raw.get('_class_name')}, not a UNet2DModel")
    c = {**UNET_DEFAULTS, **raw}
    for key, want in UNET_FIXED.items():
        if c[key] != want:
            raise _refuse(f"{key} {c[key]!r} is not supported (needs {want!r})")
    if c["act_fn"] not in ("silu", "swish"):
        raise _refuse(f"act_fn {c['act_fn']} is not supported (needs silu)")
    strip = lambda names: [n[7:] if n.startswith("UNetRes") else n for n in names]  # noqa: E731 (as diffusers does)
    down, up, chans = strip(c["down_block_types"]), strip(c["up_block_types"]), list(c["block_out_channels"])
    for kind, names, allowed in (("down", down, (DOWN, ATTN_DOWN)), ("up", up, (UP, ATTN_UP))):
        for name in names:
            if name not in allowed:
                raise CheckpointError(f"{kind}_block_types {name} is not a DDPM-family block; ddpmctl imports "
                                      f"{'/'.join(allowed)} only")
    if not (len(down) == len(up) == len(chans)) or not chans:
        raise _refuse("down_block_types, up_block_types and block_out_channels differ in length")
    ch = chans[0]
    if any(n % ch for n in chans):
        raise _refuse(f"block_out_channels {chans} are not multiples of the first")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int):
        raise _refuse(f"sample_size {c['sample_size']!r} is not one square image size")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse(f"time_embedding_dim {c['time_embedding_dim']} is not 4 x block_out_channels[0]")
    groups = c["norm_num_groups"]
    if c["attn_norm_num_groups"] not in (None, groups):
        raise _refuse(f"attn_norm_num_groups {c['attn_norm_num_groups']} differs from norm_num_groups {groups}")
    if c["downsample_padding"] not in (0, 1):
        raise _refuse(f"downsample_padding {c['downsample_padding']} is not supported (0 or 1)")
    levels = len(chans)
    attn_at = []
    for level, name in enumerate(down):
        mirrored = up[levels - 1 - level]
        if (name == ATTN_DOWN) != (mirrored == ATTN_UP):
            raise _refuse(f"attention sits in down block {level} ({name}) but not in its mirror, up block "
                          f"{levels - 1 - level} ({mirrored})")
        if name == ATTN_DOWN:
            attn_at.append(size // 2**level)
    head_dim = c["attention_head_dim"]
    if head_dim is not None and any(chans[i] % head_dim for i, n in enumerate(down) if n == ATTN_DOWN):
        raise _refuse(f"attention_head_dim {head_dim} does not divide the attention layers' channels")
    try:
        model = ModelConfig(
            img_size=size, starting_channels=ch, channel_multipliers=tuple(n // ch for n in chans),
            num_res_blocks=int(c["layers_per_block"]), attention_resolutions=tuple(attn_at), num_heads=1,
            bottleneck_blocks=2, dropout=float(c["dropout"]), time_embedding_silu=True,
            time_embedding_freq_shift=int(c["freq_shift"]),
            downsample_padding="after" if c["downsample_padding"] == 0 else "both",
            norm_groups=int(groups), norm_eps=float(c["norm_eps"]),
            attention_head_dim=None if head_dim is None else int(head_dim),
        )
        validate(Config(model=model))
    except (TypeError, ValueError) as exc:
        raise _refuse(f"config.json holds a value of the wrong type ({exc})") from None
    except ConfigError as exc:
        raise _refuse(f"config.json describes a network ddpmctl cannot build ({exc})") from None
    return model, bool(c["flip_sin_to_cos"])


def diffusion_config_from_scheduler(raw: Mapping[str, Any] | None, where: str) -> tuple[DiffusionConfig, list[str]]:
    """The DiffusionConfig of a scheduler config (DDPMScheduler's defaults for missing keys), with notes."""
    if raw is None:
        return DiffusionConfig(), [f"no {SCHEDULER_CONFIG} found beside {where}: assuming the DDPM schedule "
                                   "(linear, 1e-4 to 0.02 over 1000 steps, epsilon prediction)"]
    c = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "trained_betas": None, "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True,
         "thresholding": False, "rescale_betas_zero_snr": False, **raw}
    if c["beta_schedule"] not in SCHEDULES:
        raise CheckpointError(f"beta_schedule {c['beta_schedule']} is not supported: ddpmctl trains with "
                              "linear or squaredcos_cap_v2 (cosine) only")
    if c["trained_betas"] is not None:
        raise CheckpointError("the scheduler lists its own trained_betas: ddpmctl supports the linear and cosine "
                              "schedules only")
    if c["rescale_betas_zero_snr"]:
        raise CheckpointError("rescale_betas_zero_snr is not supported by ddpmctl's schedules")
    if c["prediction_type"] not in PREDICTIONS:
        raise CheckpointError(f"prediction_type {c['prediction_type']} is not supported: ddpmctl predicts "
                              "epsilon or v (v_prediction)")
    notes = []
    if c["variance_type"] != "fixed_small":
        notes.append(f"the scheduler samples with variance_type {c['variance_type']}; ddpmctl's ddpm sampler uses "
                     "fixed_small (the posterior variance of Ho et al. Eq. 7)")
    if not c["clip_sample"] or c["thresholding"]:
        notes.append("ddpmctl's samplers clip the predicted x0 to [-1, 1] (the scheduler did not, or thresholded)")
    return DiffusionConfig(num_diffusion_timesteps=int(c["num_train_timesteps"]),
                           beta_schedule=SCHEDULES[c["beta_schedule"]], beta_start=float(c["beta_start"]),
                           beta_end=float(c["beta_end"]), prediction_type=PREDICTIONS[c["prediction_type"]]), notes


def _layers(m: ModelConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(norm groups, eps) of every GroupNorm and (channels, heads) of every attention layer of UNet(m)."""
    with torch.device("meta"):  # shapes only: no memory, no time
        net = UNet(m)
    norms = [(mod.num_groups, mod.eps) for mod in net.modules() if isinstance(mod, torch.nn.GroupNorm)]
    attn = [(mod.proj.out_channels, mod.num_heads) for mod in net.modules() if isinstance(mod, Attention)]
    return norms, attn


HANDLED = {"img_size", "starting_channels", "channel_multipliers", "num_res_blocks", "attention_resolutions",
           "num_heads", "bottleneck_blocks", "dropout", "time_embedding_silu", "time_embedding_freq_shift",
           "downsample_padding", "norm_groups", "norm_eps", "attention_head_dim"}  # options unet_config maps


def unet_config(m: ModelConfig) -> dict[str, Any]:
    """The UNet2DModel config.json computing what UNet(m) computes, or CheckpointError naming what to change."""
    for f in dataclasses.fields(ModelConfig):
        if f.name not in HANDLED and getattr(m, f.name) != f.default:
            raise CheckpointError(f"model option {f.name} ({getattr(m, f.name)}) has no diffusers UNet2DModel "
                                  "equivalent; such a run cannot be exported")
    if not m.time_embedding_silu:
        raise CheckpointError("this run predates time_embedding_silu (its blocks project the time embedding without "
                              "SiLU), which diffusers' UNet2DModel always applies: no exact equivalent; a run trained "
                              "with --time-embedding-silu (the default now) exports")
    if m.bottleneck_blocks != 2:
        raise CheckpointError(f"bottleneck_blocks {m.bottleneck_blocks}: diffusers' mid block is resnet-attention-"
                              "resnet; a run trained with --bottleneck-blocks 2 exports")
    norms, attn = _layers(m)
    if len({g for g, _ in norms}) != 1:
        found = ", ".join(map(str, sorted({g for g, _ in norms})))
        raise CheckpointError(f"its GroupNorms have {found} groups (gcd(32, channels) per layer), diffusers one count "
                              "in every layer: a run trained with --norm-groups N (N dividing starting_channels) "
                              "exports")
    dims = {c // h for c, h in attn}
    if all(h == 1 for _, h in attn):
        head_dim = None
    elif len(dims) == 1 and all(c % h == 0 for c, h in attn):
        head_dim = dims.pop()
    else:
        raise CheckpointError(f"num_heads {m.num_heads} over attention layers of {sorted({c for c, _ in attn})} "
                              "channels: diffusers sets heads as channels / attention_head_dim; a run trained with "
                              "--attention-head-dim D (or --num-heads 1) exports")
    res = [m.img_size // 2**i for i in range(len(m.channel_multipliers))]
    attn_at = set(attention_resolutions(m))
    down = [ATTN_DOWN if r in attn_at else DOWN for r in res]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": FORMAT_VERSION, **UNET_FIXED,
        "sample_size": m.img_size, "block_out_channels": [m.starting_channels * k for k in m.channel_multipliers],
        "layers_per_block": m.num_res_blocks, "down_block_types": down,
        "up_block_types": [ATTN_UP if d == ATTN_DOWN else UP for d in reversed(down)],
        "downsample_padding": 0 if m.downsample_padding == "after" else 1, "dropout": m.dropout or 0.0,
        "act_fn": "silu", "attention_head_dim": head_dim, "norm_num_groups": norms[0][0], "attn_norm_num_groups": None,
        "norm_eps": norms[0][1], "flip_sin_to_cos": False, "freq_shift": m.time_embedding_freq_shift,
        "time_embedding_dim": None, "num_train_timesteps": None,
    }


def scheduler_config(d: DiffusionConfig) -> dict[str, Any]:
    """A DDPMScheduler config sampling as ddpmctl does (clipped x0, posterior variance, trailing spacing)."""
    if d.formulation == "edm":  # a DDPMScheduler would load it and compute something else
        raise CheckpointError("formulation edm has no diffusers scheduler (its network is preconditioned): export "
                              "it with --format safetensors")
    schedule = {v: k for k, v in SCHEDULES.items()}[d.beta_schedule]
    return {"_class_name": "DDPMScheduler", "_diffusers_version": FORMAT_VERSION,
            "num_train_timesteps": d.num_diffusion_timesteps, "beta_schedule": schedule, "beta_start": d.beta_start,
            "beta_end": d.beta_end, "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
            "clip_sample_range": 1.0, "thresholding": False,
            "prediction_type": {v: k for k, v in PREDICTIONS.items()}[d.prediction_type],
            "timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": False}


# ----------------------------------------------------------------------------- weights


def module_pairs(m: ModelConfig) -> list[tuple[str, str, str]]:
    """(ddpmctl module, diffusers module, kind) for every module with weights; kind: plain, res or attn."""
    pairs = [("temb.0", "time_embedding.linear_1", "plain"), ("temb.2", "time_embedding.linear_2", "plain"),
             ("stem", "conv_in", "plain"), ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    attn_at, levels = set(attention_resolutions(m)), len(m.channel_multipliers)

    def block(ours: str, theirs: str, b: int, attn: bool) -> None:
        pairs.append((f"{ours}.res", f"{theirs}.resnets.{b}", "res"))
        if attn:
            pairs.append((f"{ours}.attn", f"{theirs}.attentions.{b}", "attn"))

    i = 0
    for level in range(levels):
        for b in range(m.num_res_blocks):
            block(f"down.{i}", f"down_blocks.{level}", b, m.img_size // 2**level in attn_at)
            i += 1
        if level != levels - 1:
            pairs.append((f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            i += 1
    block("mid.0", "mid_block", 0, True)
    pairs.append(("mid.1.res", "mid_block.resnets.1", "res"))
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for b in range(m.num_res_blocks + 1):
            block(f"up.{i}", f"up_blocks.{k}", b, m.img_size // 2**level in attn_at)
            i += 1
        if level != 0:
            pairs.append((f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
            i += 1
    return pairs


def _names(kind: str) -> list[tuple[str, str]]:
    """(ddpmctl, diffusers) parameter names inside one module pair; qkv is handled apart."""
    if kind == "res":
        return [(f"{a}.{p}", f"{b}.{p}") for a, b in RES_NAMES.items() for p in ("weight", "bias")]
    if kind == "attn":
        return [("norm.weight", "group_norm.weight"), ("norm.bias", "group_norm.bias"),
                ("proj.weight", "to_out.0.weight"), ("proj.bias", "to_out.0.bias")]
    return [("weight", "weight"), ("bias", "bias")]


def to_diffusers(state: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """ddpmctl UNet(m) weights -> UNet2DModel weights (all of them, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    left = dict(state)
    for ours, theirs, kind in module_pairs(m):
        for a, b in _names(kind):
            if f"{ours}.{a}" in left:  # a ResBlock without a skip convolution has none
                value = left.pop(f"{ours}.{a}")
                out[f"{theirs}.{b}"] = value.flatten(1) if a == "proj.weight" else value  # 1x1 conv -> Linear
        if kind == "attn":
            w, bias = left.pop(f"{ours}.qkv.weight").flatten(1), left.pop(f"{ours}.qkv.bias")
            for j, name in enumerate(("to_q", "to_k", "to_v")):  # qkv's output rows are [q | k | v]
                out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = w.chunk(3)[j], bias.chunk(3)[j]
    if left:
        raise ValueError(f"weights not mapped to diffusers: {sorted(left)[:5]}")  # a bug in module_pairs
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_diffusers(state: Mapping[str, torch.Tensor], m: ModelConfig, flip_sin_to_cos: bool,
                   source: str) -> dict[str, torch.Tensor]:
    """UNet2DModel weights -> ddpmctl UNet(m) weights (float32); a missing or extra key is refused."""
    left = dict(state)

    def take(key: str) -> torch.Tensor:
        module, _, leaf = key.rpartition(".")
        for short, old in ATTN_ALIASES.items():  # attention weights saved before diffusers 0.14
            if module.endswith(short) and key not in left:
                key = f"{module[: -len(short)]}{old}.{leaf}"
        if key not in left:
            raise CheckpointError(f"{source} does not match its config.json: it has no {key}")
        return left.pop(key).float()

    out: dict[str, torch.Tensor] = {}
    shortcut = {k.rsplit(".", 1)[0] for k in state if ".conv_shortcut." in k}  # ResnetBlock2Ds changing width
    for ours, theirs, kind in module_pairs(m):
        for a, b in _names(kind):
            if b.startswith("conv_shortcut") and f"{theirs}.conv_shortcut" not in shortcut:
                continue
            value = take(f"{theirs}.{b}")
            out[f"{ours}.{a}"] = value[:, :, None, None] if a == "proj.weight" else value  # Linear -> 1x1 conv
        if kind == "attn":
            q, k, v = (take(f"{theirs}.{n}.weight") for n in ("to_q", "to_k", "to_v"))
            out[f"{ours}.qkv.weight"] = torch.cat([q, k, v])[:, :, None, None]
            out[f"{ours}.qkv.bias"] = torch.cat([take(f"{theirs}.{n}.bias") for n in ("to_q", "to_k", "to_v")])
    if flip_sin_to_cos:  # embedding [cos | sin] = [sin | cos] with its halves swapped: swap linear_1's input columns
        w = out["temb.0.weight"]
        half = w.shape[1] // 2
        out["temb.0.weight"] = torch.cat([w[:, half: 2 * half], w[:, :half], w[:, 2 * half:]], dim=1)
    if left:
        raise CheckpointError(f"{source} holds weights its config.json does not describe (e.g. {sorted(left)[0]})")
    return out

