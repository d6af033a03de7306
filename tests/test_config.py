from pathlib import Path

import pytest

from ddpmctl import config as C
from ddpmctl.errors import ConfigError
from ddpmctl.validation import check_attention_resolutions


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_match_the_original_script():
    cfg = C.Config()
    assert cfg.model.img_size == 128 and cfg.model.starting_channels == 128
    assert cfg.diffusion.num_diffusion_timesteps == 1000
    assert cfg.training.num_training_steps == 150000 and cfg.training.batch_size == 32
    assert cfg.training.learning_rate == 1e-4 and cfg.training.warmup_steps == 5000
    assert cfg.training.weight_decay == 1e-4 and cfg.training.max_grad_norm == 1.0
    assert cfg.diffusion.loss_fn == "mse"
    assert cfg.sampling.evaluation_interval == 5000 and cfg.sampling.plot_freq_interval == 100
    assert cfg.sampling.num_generations == 5 and cfg.logging.num_keep_checkpoints == 1
    assert cfg.logging.use_wandb is False


def test_precedence_default_yaml_flag(tmp_path):
    yaml_file = write(tmp_path / "c.yaml", "training:\n  batch_size: 12\n  learning_rate: 3e-4\nmodel:\n  img_size: 64\n")
    cfg = C.resolve(yaml_file, {"batch_size": "7"})
    assert cfg.training.batch_size == 7  # flag beats YAML
    assert cfg.training.learning_rate == pytest.approx(3e-4)  # YAML beats default (and '3e-4' is a float)
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.model.img_size == 64
    assert cfg.training.warmup_steps == 5000  # untouched default


def test_values_are_parsed_with_the_field_type(tmp_path):
    cfg = C.resolve(None, {"channel_multipliers": "1,2,2,2", "use_wandb": "false", "attention_resolutions": "16",
                           "num_training_steps": "1e3", "sampling_steps": "none"})
    assert cfg.model.channel_multipliers == (1, 2, 2, 2)
    assert cfg.model.attention_resolutions == (16,)
    assert cfg.logging.use_wandb is False
    assert cfg.training.num_training_steps == 1000
    assert cfg.sampling.sampling_steps is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("training:\n  batch_sise: 4\n", "training.batch_sise"),
        ("bogus: 1\n", "'bogus'"),
        ("model:\n  batch_size: 4\n", "model.batch_size"),
        ("training:\n  batch_size: many\n", "batch_size must be a number"),
        ("diffusion:\n  loss_fn: l3\n", "loss_fn must be one of mse, mae, huber"),
        ("training: [1, 2]\n", "section 'training' must be a mapping"),
        ("training:\n  batch_size: 0\n", "batch_size must be at least 1"),
    ],
)
def test_bad_yaml_is_an_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        C.resolve(write(tmp_path / "bad.yaml", text), {})


def test_unknown_override_and_missing_file():
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        C.resolve(None, {"nope": 1})
    with pytest.raises(ConfigError, match="does not exist"):
        C.resolve("/no/such/file.yaml", {})


def test_img_size_must_suit_the_stages():
    with pytest.raises(ConfigError, match="divisible by 8"):
        C.resolve(None, {"img_size": "36", "channel_multipliers": "1,2,3,4"})


def test_dump_and_reload_round_trip(tmp_path):
    cfg = C.resolve(None, {"img_size": 32, "channel_multipliers": "1,2,2", "learning_rate": "2e-4"})
    path = write(tmp_path / "config.yaml", C.dump_yaml(cfg))
    assert C.load_yaml(path) == cfg


def test_every_option_has_help_text():
    missing = [s.name for s in C.field_specs() if not s.help]
    assert missing == []


def test_presets_load():
    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(root.glob("*.yaml"))
    assert len(presets) >= 3
    for preset in presets:
        C.load_yaml(preset)
    cifar = C.load_yaml(root / "cifar10_ddpm.yaml")
    assert cifar.model.channel_multipliers == (1, 2, 2, 2) and cifar.model.dropout == 0.1


def test_cifar_preset_has_the_paper_parameter_count():
    from ddpmctl.model import UNet, count_parameters

    cifar = C.load_yaml(Path(__file__).resolve().parents[1] / "configs" / "cifar10_ddpm.yaml")
    assert round(count_parameters(UNet(cifar.model)) / 1e6, 1) == 35.7


def test_attention_at_a_resolution_the_model_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"attention_resolutions 5: this model's stages work at 16, 8 px"):
        check_attention_resolutions(
            C.resolve(None, {"img_size": 16, "channel_multipliers": "1,2", "attention_resolutions": "8,5"}).model)
    check_attention_resolutions(
        C.resolve(None, {"img_size": 16, "channel_multipliers": "1,2", "attention_resolutions": "16,8"}).model)
    with pytest.raises(ConfigError, match=r"^dropout must be below 1, got 1.5$"):
        C.resolve(None, {"dropout": 1.5})


def test_a_saved_model_section_without_a_later_option_gets_the_value_it_trained_with() -> None:
    old = {"img_size": 16, "channel_multipliers": [1, 2]}  # as in a file exported before time_embedding_silu
    assert C.saved_model_config(old).time_embedding_silu is False
    assert C.saved_model_config({**old, "time_embedding_silu": True}).time_embedding_silu is True
    assert C.ModelConfig().time_embedding_silu is True  # new runs


def test_edm_takes_a_presets_prediction_type_but_refuses_a_loss_weight() -> None:
    cfg = C.resolve(None, {"formulation": "edm", "prediction_type": "v"})  # a preset's v is ignored by EDM
    assert cfg.diffusion.formulation == "edm"
    with pytest.raises(ConfigError, match="formulation edm has its own loss weight"):
        C.resolve(None, {"formulation": "edm", "loss_weighting": "min_snr"})
