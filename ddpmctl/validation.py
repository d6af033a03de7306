"""Which configurations can work: each check says what to change. Values were already parsed to their types."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, ModelConfig


def check_attention_resolutions(m: ModelConfig) -> None:
    """Refuse attention at a resolution the network does not have (it would silently get none there).

    Checked when a run starts, not in :func:`validate`: that runs at each layer of defaults < YAML < options,
    where a YAML file's ``attention_resolutions: [8]`` may wait for ``--img-size 16`` from the command line.
    """
    stages = [m.img_size // 2**i for i in range(len(m.channel_multipliers))]
    wrong = sorted(set(m.attention_resolutions or ()) - set(stages))
    if wrong:
        raise ConfigError(
            f"attention_resolutions {', '.join(map(str, wrong))}: this model's stages work at "
            f"{', '.join(map(str, stages))} px; pick among those (or leave it unset: after every downsampling)"
        )


def validate(cfg: Config) -> None:
    """Reject values that cannot work, with a message that says what to change."""
    m, d, t, s, lg = cfg.model, cfg.diffusion, cfg.training, cfg.sampling, cfg.logging
    positive = {
        "img_size": m.img_size, "starting_channels": m.starting_channels, "num_res_blocks": m.num_res_blocks,
        "num_heads": m.num_heads, "num_diffusion_timesteps": d.num_diffusion_timesteps,
        "num_training_steps": t.num_training_steps, "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "evaluation_interval": s.evaluation_interval,
        "num_generations": s.num_generations, "plot_freq_interval": s.plot_freq_interval,
        "num_keep_checkpoints": lg.num_keep_checkpoints, "log_interval": lg.log_interval,
        "max_bad_steps": t.max_bad_steps,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    non_negative = {
        "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm, "dropout": m.dropout or 0.0, "ema_decay": t.ema_decay, "eta": s.eta,
        "bottleneck_blocks": m.bottleneck_blocks, "num_workers": cfg.data.num_workers, "augment": cfg.data.augment,
        "class_dropout": t.class_dropout, "augment_dim": m.augment_dim,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    for name, value in (("norm_groups", m.norm_groups), ("attention_head_dim", m.attention_head_dim)):
        if value is not None and (value < 1 or m.starting_channels % value):
            raise ConfigError(f"{name} must divide starting_channels ({m.starting_channels}), got {value}")
    if not 0 < m.norm_eps < 1:
        raise ConfigError(f"norm_eps must be between 0 and 1, got {m.norm_eps}")
    if m.time_embedding_freq_shift and not 0 < m.time_embedding_freq_shift < m.starting_channels // 2:
        raise ConfigError(f"time_embedding_freq_shift must be from 0 to starting_channels / 2 - 1, "
                          f"got {m.time_embedding_freq_shift}")
    if not m.channel_multipliers or min(m.channel_multipliers) < 1:
        raise ConfigError("channel_multipliers must be a list of positive integers, e.g. 1,2,2,2")
    factor = 2 ** (len(m.channel_multipliers) - 1)
    if m.img_size % factor:
        raise ConfigError(
            f"img_size {m.img_size} must be divisible by {factor} for {len(m.channel_multipliers)} stages; "
            "change img_size or channel_multipliers"
        )
    for name, value in (("dropout", m.dropout or 0.0), ("ema_decay", t.ema_decay), ("class_dropout", t.class_dropout)):
        if value >= 1:
            raise ConfigError(f"{name} must be below 1, got {value}")
    if cfg.data.augment > 1:
        raise ConfigError(f"augment is a probability: at most 1, got {cfg.data.augment} (0.12 is a good start)")
    if len(set(m.class_names)) != len(m.class_names):
        raise ConfigError(f"class_names must be distinct, got {', '.join(m.class_names)}")
    if s.sampling_steps is not None and not 1 <= s.sampling_steps <= d.num_diffusion_timesteps:
        raise ConfigError(f"sampling_steps must be between 1 and num_diffusion_timesteps ({d.num_diffusion_timesteps})")
    if d.formulation == "edm" and d.loss_weighting != "none":  # (its prediction_type is ignored: a preset may set v)
        raise ConfigError("formulation edm has its own loss weight: leave loss_weighting at none (or use formulation "
                          "ddpm)")
    if d.min_snr_gamma <= 0:
        raise ConfigError(f"min_snr_gamma must be positive, got {d.min_snr_gamma}")
    if t.ema_halflife_images is not None and t.ema_halflife_images < 1:
        raise ConfigError(f"ema_halflife_images must be at least 1, got {t.ema_halflife_images}")
    if d.beta_schedule == "linear" and not 0 < d.beta_start < d.beta_end < 1:
        raise ConfigError("the linear schedule needs 0 < beta_start < beta_end < 1")
