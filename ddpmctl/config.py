"""Typed run configuration: nested dataclasses, YAML loading, command-line overrides, dumping.

Precedence is built-in defaults < ``--config FILE`` (YAML) < command-line options. Every value is
parsed with its field's declared type (PyYAML reads ``1e-4`` as a string), and an unknown key is an
error that names it. The trailing comment on each field is its ``--help`` text.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .layout import RUN_CONFIG
from .validation import validate


@dataclass
class RunConfig:
    experiment_name: str = "ddpm"  # name of the run: its folder under working_directory and generated_directory
    working_directory: str = "./working"  # where each run keeps config.yaml, checkpoints and logs
    generated_directory: str = "./generated"  # where each run writes its step_<N>.png progression grids
    seed: int = 0  # seeds weights, data order, noise and evaluation noise; the same seed repeats a run
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"  # auto picks CUDA, then MPS, then the CPU


@dataclass
class ModelConfig:
    img_size: int = 128  # image width and height in pixels
    starting_channels: int = 128  # channels after the first convolution (C)
    channel_multipliers: tuple[int, ...] = (1, 2, 3, 4)  # channels of each resolution stage, times C
    num_res_blocks: int = 1  # residual blocks per encoder stage (the decoder has one more)
    attention_resolutions: tuple[int, ...] | None = None  # resolutions with self-attention; none given: after every downsampling
    num_heads: int = 4  # attention heads
    bottleneck_blocks: int = 2  # residual blocks at the lowest resolution (attention sits between them)
    dropout: float | None = None  # dropout inside residual blocks; none given: 0.1 below 10,000 training images, else 0
    time_embedding_silu: bool = True  # SiLU on the time embedding before each block's projection (Ho et al.); off: older runs
    time_embedding_freq_shift: int = 0  # time embedding frequencies exp(-ln(1e4) i / (C/2 - this)); Ho et al.'s code: 1
    downsample_padding: Literal["both", "after"] = "both"  # downsampling pads all sides, or right/bottom (Ho et al.'s)
    norm_groups: int | None = None  # GroupNorm groups in every layer; none given: gcd(32, channels) per layer
    norm_eps: float = 1e-6  # GroupNorm epsilon
    attention_head_dim: int | None = None  # channels per attention head (heads = channels / this); none: num_heads heads
    class_names: tuple[str, ...] = ()  # the classes of a class-conditional model, set from the data's class folders
    augment_dim: int = 0  # inputs telling the network which augmentation was applied (set by --augment)


@dataclass
class DiffusionConfig:
    formulation: Literal["ddpm", "edm"] = "ddpm"  # ddpm: Ho et al.; edm: Karras et al. 2022 (preconditioned net, lognormal noise)
    num_diffusion_timesteps: int = 1000  # number of diffusion timesteps T (edm: noise levels on its sampling grid)
    beta_schedule: Literal["linear", "cosine"] = "linear"  # linear (Ho et al.) or cosine (Nichol & Dhariwal); ddpm only
    beta_start: float = 1e-4  # first beta of the linear schedule
    beta_end: float = 0.02  # last beta of the linear schedule
    prediction_type: Literal["epsilon", "v"] = "epsilon"  # what the network predicts: the noise, or v (ddpm only)
    loss_fn: Literal["mse", "mae", "huber"] = "mse"  # loss between prediction and target
    loss_weighting: Literal["none", "min_snr"] = "none"  # min_snr: Min-SNR-gamma weights of Hang et al. 2023 (ddpm only)
    min_snr_gamma: float = 5.0  # gamma of min_snr: the signal-to-noise ratio above which the weight stops growing


@dataclass
class DataConfig:
    path_to_data: str | None = None  # folder of training images (searched recursively), or a prepared folder
    num_workers: int = 4  # DataLoader worker processes; 0 loads in the main process
    random_flip: bool = True  # flip half the images left-right (done on the device)
    classes: Literal["auto", "none"] = "auto"  # auto: one level of subfolders are classes (2+ folders, no loose images)
    augment: float = 0.0  # probability of each non-leaking augmentation (Karras et al. 2022); 0.12 helps small sets


@dataclass
class TrainingConfig:
    num_training_steps: int = 150000  # total optimizer steps
    batch_size: int = 32  # images per micro-batch on EACH process (torchrun: global batch = this x accumulation x world size)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (effective batch = batch_size x this x processes)
    learning_rate: float = 1e-4  # peak learning rate of the cosine schedule
    warmup_steps: int = 5000  # optimizer steps of linear learning-rate warmup
    weight_decay: float = 1e-4  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clipping threshold; 0 turns clipping off
    class_dropout: float = 0.1  # class-conditional runs: share of labels dropped, so one network also learns unconditional
    ema_decay: float = 0.9999  # EMA decay of the weights; 0 turns EMA off
    ema_warmup: bool = True  # ramp the EMA up (decay (1+n)/(10+n); half-life over 5% of the images): early samples are not noise
    ema_halflife_images: int | None = None  # EMA half-life in images seen (Karras et al.), replaces ema_decay; batch-size proof
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, else fp32 (bf16 on request: MPS, bf16 CPUs)
    compile: bool = False  # torch.compile the model: a minute to compile, then faster on CUDA, not CPUs (docs/performance.md)
    channels_last: bool = False  # channels-last memory format on CUDA (off by default: NCHW trained faster, docs/performance.md)
    cuda_graph: bool = True  # CUDA: replay each step as one captured CUDA graph (bf16/fp32, no accumulation; torchrun too)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more time, same gradients
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    resume_from_checkpoint: str | None = None  # checkpoint_<step> or latest: continue the run from it
    init_from: str | None = None  # start a new run from trained weights: a diffusers folder, a run or checkpoint, an export


@dataclass
class SamplingConfig:
    evaluation_interval: int = 5000  # optimizer steps between checkpoints and progression grids
    num_generations: int = 5  # rows (samples) in each progression grid
    plot_freq_interval: int = 100  # timesteps between the columns of a progression grid
    sampler: Literal["ddpm", "ddim", "dpmpp2m", "heun"] = "ddpm"  # sampler for the progression grids
    sampling_steps: int | None = None  # denoising steps for ddim/dpmpp2m/heun; none: all timesteps
    eta: float = 0.0  # DDIM noise scale: 0 deterministic, 1 like DDPM
    show_x0: bool = False  # add a row of predicted x_0 under each grid sample


@dataclass
class LoggingConfig:
    num_keep_checkpoints: int = 1  # number of recent checkpoints to keep
    log_interval: int = 10  # optimizer steps between loss read-backs (each one waits for the device)
    memorization_check: bool = True  # a line at each evaluation: are the grid's samples copies of training images?
    use_wandb: bool = False  # log to Weights & Biases (pip install 'ddpmctl[wandb]')
    wandb_project: str = "ddpmctl"  # Weights & Biases project name


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        """WORKING_DIRECTORY/EXPERIMENT_NAME: config, checkpoints, metrics."""
        return Path(self.run.working_directory) / self.run.experiment_name

    @property
    def generated_dir(self) -> Path:
        """GENERATED_DIRECTORY/EXPERIMENT_NAME: progression grids."""
        return Path(self.run.generated_directory) / self.run.experiment_name


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


@dataclass(frozen=True)
class FieldSpec:
    """One leaf option: where it lives, its type, its default and its help text."""

    section: str
    name: str
    type: Any
    default: Any
    help: str


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the trailing comment on its line (its help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    current = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current:
            comments[current] = tok.string.lstrip("# ").strip()
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            current = None
    return comments


@functools.cache
def field_specs() -> tuple[FieldSpec, ...]:
    """Every leaf option of :class:`Config`, in declaration order; names are unique across sections."""
    specs = []
    hints_root = typing.get_type_hints(Config)
    for section in SECTIONS:
        cls = hints_root[section]
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            specs.append(FieldSpec(section, f.name, hints[f.name], f.default, comments.get(f.name, "")))
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "option names must be unique across sections"
    return tuple(specs)


def spec_by_name() -> dict[str, FieldSpec]:
    return {s.name: s for s in field_specs()}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_value(tp: Any, raw: Any, key: str) -> Any:
    """Convert ``raw`` (from YAML or the command line) to the declared type ``tp``, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(inner[0], raw, key)
    if origin is Literal:
        value = str(raw)
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, not {raw!r}")
        return value
    if origin is tuple:
        if isinstance(raw, str):
            items = [p for p in raw.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",")]
            items = [p.strip() for p in items if p.strip()]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            items = [raw]
        return tuple(parse_value(args[0], item, key) for item in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, not {raw!r}")
    if tp in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{key} must be a number ({_type_name(tp)}), not {raw!r}")
        try:
            if tp is int:
                value = float(raw) if isinstance(raw, str) and any(c in raw for c in ".eE") else raw
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number ({_type_name(tp)}), not {raw!r}") from None
    if tp is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{key} must be a string, not {raw!r}")
        return str(raw)
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in this file, not a user error


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with leaf options (by name, e.g. ``batch_size``) replaced and parsed."""
    specs = spec_by_name()
    sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}
    for name, raw in overrides.items():
        spec = specs.get(name)
        if spec is None:
            raise ConfigError(f"unknown option {name!r}")
        sections[spec.section][name] = parse_value(spec.type, raw, name)
    new = Config(**{s: type(getattr(cfg, s))(**values) for s, values in sections.items()})
    validate(new)
    return new


def flatten(data: dict[str, Any] | None, source: str = "config") -> dict[str, Any]:
    """Check a nested mapping (as in YAML) against the schema and flatten it to leaf names.

    Flat leaf names at the top level are accepted too. Unknown keys are errors that name the key.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    specs = spec_by_name()
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            for name, raw in value.items():
                spec = specs.get(name)
                if spec is None or spec.section != key:
                    raise ConfigError(f"{source}: unknown key {key}.{name}")
                flat[name] = raw
        elif key in specs:
            flat[key] = value
        else:
            raise ConfigError(f"{source}: unknown key {key!r}")
    return flat


def from_dict(data: dict[str, Any] | None, source: str = "config", base: Config | None = None) -> Config:
    """Build a Config from a nested mapping laid over ``base`` (built-in defaults when None)."""
    flat = flatten(data, source)
    try:
        return apply_overrides(base or Config(), flat)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_yaml(path: str | Path, base: Config | None = None, saved: bool = False) -> Config:
    """Read a YAML config file (laid over ``base``), or raise ConfigError with a clear reason.

    ``saved``: the file is a run's own config.yaml: options it predates get the value it trained with
    (:func:`complete_saved`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if saved and isinstance(data, dict):
        data = complete_saved(data)
    return from_dict(data, source=str(path), base=base)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain-value mapping of ``cfg`` (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in SECTIONS}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Model options added after runs could already be saved, with the value that rebuilds the network those
# runs trained. A saved configuration (a run's config.yaml, a checkpoint's meta.json, an exported file's
# metadata) that lacks one was written before the option existed.
SAVED_BEFORE = {"time_embedding_silu": False, "time_embedding_freq_shift": 0, "downsample_padding": "both",
                "norm_groups": None, "norm_eps": 1e-6, "attention_head_dim": None}


def complete_saved(data: dict[str, Any] | None) -> dict[str, Any]:
    """A saved configuration mapping with the options it predates set as it trained (see SAVED_BEFORE)."""
    data = dict(data or {})
    model = data.get("model")
    if isinstance(model, dict):
        data["model"] = {**SAVED_BEFORE, **model}
    return data


def saved_model_config(model: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a saved model section (e.g. an exported file's ``model_config``), as it trained."""
    return ModelConfig(**complete_saved({"model": model})["model"])


def resolve(config_file: str | Path | None, overrides: dict[str, Any], base: Config | None = None) -> Config:
    """``base`` (built-in defaults when None) < YAML file < overrides (only options actually given)."""
    cfg = load_yaml(config_file, base) if config_file else (base or Config())
    return apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})


def resolve_for_resume(config_file: str | Path | None, overrides: dict[str, Any]) -> Config:
    """The run's own config.yaml < YAML file < overrides; resumes from 'latest' unless told otherwise."""
    located = resolve(config_file, overrides)  # only to find WORKING_DIRECTORY/EXPERIMENT_NAME
    saved = located.run_dir / RUN_CONFIG
    if not saved.is_file():
        work = Path(located.run.working_directory)
        runs = sorted(p.parent.name for p in work.glob(f"*/{RUN_CONFIG}")) if work.is_dir() else []
        found = (f"runs in {work}: {', '.join(runs)}" if runs else
                 f"{work} holds no run" if work.is_dir() else f"{work} does not exist")
        raise ConfigError(
            f"no run to resume at {located.run_dir} (it has no config.yaml): check --experiment-name "
            f"and --working-directory ({found})"
        )
    base = load_yaml(saved, saved=True)
    # Where the run lives comes from the command line, even if the folder was moved since; which checkpoint
    # to resume from is this command's choice, never the one an earlier resume recorded in config.yaml.
    base = apply_overrides(base, {"experiment_name": located.run.experiment_name,
                                  "working_directory": located.run.working_directory,
                                  "resume_from_checkpoint": None})
    cfg = resolve(config_file, overrides, base=base)
    if not cfg.training.resume_from_checkpoint:
        cfg = apply_overrides(cfg, {"resume_from_checkpoint": "latest"})
    return cfg


def absolute_path(path: str | None) -> str | None:
    """``path`` with ``~`` expanded, made absolute against the current directory (None stays None)."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its folders made absolute (``~`` expanded), so the config.yaml a run writes means the same
    from any directory: ``resume`` and ``sample`` run from elsewhere find the data and the grids' folder."""
    paths = {"working_directory": cfg.run.working_directory, "generated_directory": cfg.run.generated_directory,
             "path_to_data": cfg.data.path_to_data, "init_from": cfg.training.init_from}
    return apply_overrides(cfg, {k: absolute_path(v) for k, v in paths.items() if v})
