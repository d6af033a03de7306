"""Import from and export to the diffusers format, checked against diffusers itself (installed for tests only).

The published DDPM models' configs (google/ddpm-cifar10-32; the 256 px family of google/ddpm-celebahq-256,
-church-256, -bedroom-256, -cat-256), at reduced width and size, with random weights: ddpmctl's forward pass
must equal diffusers' (fp32, several timesteps), and a folder ddpmctl exports must compute in diffusers what
the run computes in ddpmctl, DDIM loop included.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import assert_one_line_error, tiny_args
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ddpmctl import diffusers_format
from ddpmctl.cli.main import app
from ddpmctl.config import ModelConfig, complete_saved, from_dict, resolve, saved_model_config
from ddpmctl.engine import train
from ddpmctl.errors import CheckpointError
from ddpmctl.inference import load_model
from ddpmctl.model import UNet, timestep_embedding
from ddpmctl.pretrained import load_pretrained
from ddpmctl.sampling import sample

diffusers = pytest.importorskip("diffusers")
UNet2DModel, DDPMScheduler, DDIMScheduler = diffusers.UNet2DModel, diffusers.DDPMScheduler, diffusers.DDIMScheduler
runner = CliRunner()
TIMESTEPS = torch.tensor([0, 1, 250, 999])

# google/ddpm-cifar10-32's config.json, widths and size reduced (published: 128, 256, 256, 256 at 32 px).
CIFAR10 = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
               norm_num_groups=32)
# google/ddpm-celebahq-256 (and -church/-bedroom/-cat-256): published 128, 128, 256, 256, 512, 512 at 256 px.
CELEBAHQ = dict(CIFAR10, sample_size=32, block_out_channels=(32, 32, 64, 64, 96, 96), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
# What diffusers' own unconditional training example builds (its defaults: [cos | sin], 8-channel heads, eps 1e-5).
DIFFUSERS_DEFAULTS = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with random weights (biases and norms perturbed too, so every mapping matters)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def max_difference(ours: torch.nn.Module, theirs: UNet2DModel, size: int) -> float:
    x = torch.randn((len(TIMESTEPS), 3, size, size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(x, TIMESTEPS) - theirs(x, TIMESTEPS).sample).abs().max().item()


def ddpmctl_net(pre) -> UNet:
    net = UNet(pre.model).eval()
    net.load_state_dict(pre.weights)
    return net


@pytest.mark.parametrize("name,config,layout", [
    ("cifar10-32", CIFAR10, "flat"), ("celebahq-256", CELEBAHQ, "pipeline"), ("diffusers-defaults", DIFFUSERS_DEFAULTS, "unet"),
])
def test_imported_model_computes_what_diffusers_computes(tmp_path, name, config, layout):
    """The published configs (and diffusers' defaults) import exactly: the same output within 1e-4."""
    theirs = random_unet(config)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", num_train_timesteps=500)
    unet_dir = tmp_path / ("unet" if layout == "pipeline" else "model")
    theirs.save_pretrained(unet_dir, safe_serialization=True)
    if layout != "unet":  # flat: scheduler_config.json beside config.json, as in the google/ddpm-* repositories
        scheduler.save_pretrained(tmp_path / "scheduler" if layout == "pipeline" else unet_dir)
    pre = load_pretrained(tmp_path if layout == "pipeline" else unet_dir)
    diff = max_difference(ddpmctl_net(pre), theirs, config["sample_size"])
    print(f"{name}: max |ddpmctl - diffusers| = {diff:.2e}")
    assert diff < 1e-4
    if layout == "unet":
        assert pre.diffusion.beta_schedule == "linear" and any("no scheduler_config.json" in n for n in pre.notes)
    else:
        d = pre.diffusion
        assert (d.beta_schedule, d.prediction_type, d.num_diffusion_timesteps) == ("cosine", "v", 500)


def test_attention_weights_saved_before_diffusers_0_14_import(tmp_path):
    """Older files name the attention weights query/key/value/proj_attn (diffusers renames them on load)."""
    theirs = random_unet(CIFAR10)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    file = tmp_path / diffusers_format.UNET_WEIGHTS
    state = load_file(str(file))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, before in old.items():
            key = key.replace(f".{new}.", f".{before}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(file), metadata={"format": "pt"})
    assert max_difference(ddpmctl_net(load_pretrained(tmp_path)), theirs, 16) < 1e-4


@pytest.fixture(scope="module")
def exportable_run(tmp_path_factory, tiny_images):
    """A tiny trained run whose network diffusers can express (one GroupNorm group count, 8-channel heads)."""
    work = tmp_path_factory.mktemp("export")
    args = tiny_args(tiny_images, work, steps=3, norm_groups=8, time_embedding_freq_shift=1,
                     downsample_padding="after", num_diffusion_timesteps=1000, dropout=0.1)
    overrides = {args[i][2:].replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    result = train(resolve(None, overrides))
    return work / "working" / "tiny", result


def test_export_loads_in_diffusers_and_computes_the_same(tmp_path, exportable_run):
    run, _ = exportable_run
    out = tmp_path / "exported"
    result = runner.invoke(app, ["checkpoints", "export", str(run), "--format", "diffusers", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model_index.json", "sample_grid.png", "scheduler", "unet"]
    card = (out / "README.md").read_text()
    assert "3 optimizer steps, 24 images seen" in card and "sample_grid.png" in card and "norm_groups: 8" in card
    loaded = load_model(run, device="cpu")  # the EMA weights, as exported
    unet = UNet2DModel.from_pretrained(out / "unet").eval()
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    diff = max_difference(loaded.model, unet, 16)
    print(f"exported tiny run: max |ddpmctl - diffusers UNet2DModel| = {diff:.2e}")
    assert diff < 1e-4
    assert max_difference(loaded.model, pipe.unet.eval(), 16) < 1e-4
    assert pipe.scheduler.config.clip_sample and pipe.scheduler.config.variance_type == "fixed_small"

    # DDIM-20 from the same noise: ddpmctl's sampler against diffusers' DDIMScheduler loop (trailing spacing,
    # x0 clipped and eps re-derived from it, as ddpmctl does; tests/test_reference.py explains each setting).
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    ours = sample(loaded.model, loaded.schedule, noise, "ddim", steps=20).images
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(20)
    x = noise.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    diff = (ours - x).abs().max().item()
    print(f"DDIM-20: max |ddpmctl - diffusers| = {diff:.2e}")
    assert diff < 1e-4

    # Back in: the exported folder imports to the same weights (what train --init-from would start from).
    again = load_pretrained(out)
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(again.weights[key], value, rtol=0, atol=0)
    assert again.model.norm_groups == 8 and again.diffusion == loaded.config.diffusion


def test_load_pretrained_reads_every_kind_of_source(tmp_path, exportable_run):
    """Run folder, checkpoint folder, exported .safetensors file, diffusers export: the same EMA weights."""
    run, result = exportable_run
    file = tmp_path / "tiny.safetensors"
    assert runner.invoke(app, ["checkpoints", "export", str(run), "--out", str(file)]).exit_code == 0
    assert runner.invoke(app, ["checkpoints", "export", str(run), "--format", "diffusers", "--out",
                               str(tmp_path / "d")]).exit_code == 0
    ema = load_file(str(run / f"checkpoint_{result.step}" / "ema.safetensors"))
    for source in (run, run / f"checkpoint_{result.step}", file, tmp_path / "d", tmp_path / "d" / "unet"):
        pre = load_pretrained(source)
        assert pre.weights.keys() == ema.keys(), source
        assert all(torch.equal(pre.weights[k], ema[k]) for k in ema), source
        assert pre.diffusion.num_diffusion_timesteps == 1000 and pre.model.downsample_padding == "after"
        net = UNet(pre.model)
        net.load_state_dict(pre.weights)
    assert load_pretrained(run).ema and load_pretrained(run).step == 3
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "missing")


def test_export_replaces_only_an_earlier_export(tmp_path, exportable_run):
    run, _ = exportable_run
    out = tmp_path / "exported"
    args = ["checkpoints", "export", str(run), "--format", "diffusers", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert_one_line_error(runner.invoke(app, args), "already holds a diffusers export", "--force")
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    result = runner.invoke(app, [*args[:-1], str(other), "--force"])
    assert_one_line_error(result, "not a diffusers export")
    assert (other / "mine.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob(".*old*"))


def test_export_refuses_a_network_diffusers_cannot_express(tmp_path, tiny_images):
    """The default tiny run has 8- and 16-group GroupNorms (gcd(32, channels)): no exact UNet2DModel."""
    assert runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=1)]).exit_code == 0
    result = runner.invoke(app, ["checkpoints", "export", str(tmp_path / "working" / "tiny"), "--format",
                                 "diffusers", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "8, 16, 32 groups (gcd(32, channels) per layer)", "--norm-groups")
    assert not (tmp_path / "out").exists()
    for config, needle in ((dict(time_embedding_silu=False), "--time-embedding-silu"),
                           (dict(bottleneck_blocks=1), "--bottleneck-blocks 2"),
                           (dict(norm_groups=8, num_heads=4, channel_multipliers=(1, 2, 4)), "--attention-head-dim")):
        model = ModelConfig(img_size=16, starting_channels=8, **config)
        with pytest.raises(CheckpointError, match=needle):
            diffusers_format.unet_config(model)


def test_import_cli_makes_a_run_that_samples_lists_and_exports(tmp_path):
    src = tmp_path / "ddpm-cifar10-32"
    random_unet(CIFAR10).save_pretrained(src, safe_serialization=True)
    DDPMScheduler(variance_type="fixed_large").save_pretrained(src)  # as google/ddpm-cifar10-32's
    run = tmp_path / "runs" / "cifar"
    result = runner.invoke(app, ["import", str(src), "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "fixed_large" in result.output and "checkpoint_0" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_0", "config.yaml"]
    listed = runner.invoke(app, ["checkpoints", "list", str(run)])
    assert listed.exit_code == 0 and "checkpoint_0" in listed.output and "ok" in listed.output
    sampled = runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--num", "2",
                                  "--sampler", "ddim", "--steps", "2", "--device", "cpu"])
    assert sampled.exit_code == 0, sampled.output
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 2
    exported = runner.invoke(app, ["checkpoints", "export", str(run), "--format", "diffusers", "--out",
                                   str(tmp_path / "back")])
    assert exported.exit_code == 0, exported.output
    assert "imported from" in (tmp_path / "back" / "README.md").read_text()
    assert_one_line_error(runner.invoke(app, ["import", str(src), "--out", str(run)]), "already exists")


def test_a_pickle_only_folder_is_refused_with_the_conversion_command(tmp_path):
    random_unet(DIFFUSERS_DEFAULTS).save_pretrained(tmp_path / "m", safe_serialization=False)
    assert (tmp_path / "m" / "diffusion_pytorch_model.bin").is_file()
    result = runner.invoke(app, ["import", str(tmp_path / "m"), "--out", str(tmp_path / "run")])
    assert_one_line_error(result, "pickle", "safetensors only", "save_pretrained(", "safe_serialization=True)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,needle", [
    (dict(down_block_types=["SkipDownBlock2D", "AttnDownBlock2D"]),
     "down_block_types SkipDownBlock2D is not a DDPM-family block; ddpmctl imports DownBlock2D/AttnDownBlock2D only"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift 'scale_shift' is not supported"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "attention sits in down block 1"),
    (dict(num_class_embeds=10), "num_class_embeds 10 is not supported"),
])
def test_unsupported_architectures_are_refused_in_one_line(tmp_path, change, needle):
    config = {"_class_name": "UNet2DModel", **DIFFUSERS_DEFAULTS, **change}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["import", str(tmp_path / "m"), "--out", str(tmp_path / "run")])
    assert_one_line_error(result, needle)


def test_saved_configs_without_the_new_options_build_the_old_network():
    """A config.yaml / meta.json written before these options: gcd(32, C) groups, eps 1e-6, padding on every side,
    frequencies exp(-ln(1e4) i / (C/2)), num_heads heads: the network those runs trained."""
    old = {"img_size": 16, "starting_channels": 24, "channel_multipliers": [1, 2], "num_heads": 4,
           "time_embedding_silu": True}
    cfg = from_dict(complete_saved({"model": old})).model  # how config.yaml and meta.json are read
    assert cfg == saved_model_config({**old, "channel_multipliers": (1, 2)})  # how exported files are read
    assert (cfg.norm_groups, cfg.norm_eps, cfg.downsample_padding, cfg.time_embedding_freq_shift,
            cfg.attention_head_dim) == (None, 1e-6, "both", 0, None)
    net = UNet(cfg)
    groups = {m.num_channels: (m.num_groups, m.eps) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups[24] == (8, 1e-6) and groups[48] == (16, 1e-6) and groups[72] == (8, 1e-6)
    down = [m for m in net.down if hasattr(m, "pad_after")][0]
    assert down.conv.padding == (1, 1) and not down.pad_after
    assert {m.num_heads for m in net.modules() if hasattr(m, "qkv")} == {4}
    t = torch.tensor([0, 7, 999])
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(12) / 12)
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 24), expected)


def test_an_edm_run_is_not_exported_as_a_ddpm_pipeline():
    from ddpmctl.config import DiffusionConfig
    from ddpmctl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="formulation edm has no diffusers scheduler"):
        diffusers_format.scheduler_config(DiffusionConfig(formulation="edm"))


def test_an_exported_run_re_imported_fine_tunes_and_resumes(tmp_path, exportable_run, tiny_images):
    """Export -> import -> train --init-from a few steps on the CPU: the weights it starts from are the export's,
    the network and diffusion settings come from it, the fine-tuning defaults apply, and the run resumes."""
    run, _ = exportable_run
    exported, imported = tmp_path / "exported", tmp_path / "imported"
    assert runner.invoke(app, ["checkpoints", "export", str(run), "--format", "diffusers", "--out", str(exported)]).exit_code == 0
    assert runner.invoke(app, ["import", str(exported), "--out", str(imported)]).exit_code == 0
    start = load_pretrained(imported).weights
    args = tiny_args(tiny_images, tmp_path, steps=2, img_size=32, starting_channels=16)  # both ignored: from the weights
    at = args.index("--warmup-steps")
    del args[at:at + 2]  # let the fine-tuning default apply
    result = runner.invoke(app, ["train", *args, "--init-from", str(imported)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "fine-tuning EMA weights of step 0 from" in text and "learning rate 2e-05 after 200 warm-up steps" in text
    assert "img_size 32 ignored: the network comes from --init-from (img_size 16)" in text
    tuned = tmp_path / "working" / "tiny"
    saved = yaml.safe_load((tuned / "config.yaml").read_text())
    assert saved["model"]["norm_groups"] == 8 and saved["model"]["img_size"] == 16
    assert saved["training"]["learning_rate"] == 2e-5 and saved["training"]["init_from"] == str(imported)

    # The first step moved the weights away from the start, by a fine-tuning-sized step.
    first = load_model(tuned, device="cpu", use_ema=False).model.state_dict()
    moved = max((first[k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 1e-2
    resumed = runner.invoke(app, ["resume", "--experiment-name", "tiny", "--working-directory",
                                  str(tmp_path / "working"), "--num-training-steps", "3"])
    assert resumed.exit_code == 0 and "resuming at step 2" in resumed.output, resumed.output
