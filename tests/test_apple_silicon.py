"""Apple Silicon without a Mac: what training says and does on MPS, checked through fakes and CPU stand-ins.

The MPS pitfalls and what ddpmctl does about each: docs/apple-silicon.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpmctl import host, runtime, sampling
from ddpmctl.config import Config, apply_overrides
from ddpmctl.data import BatchStream, build_dataset
from ddpmctl.inference import step_generators
from ddpmctl.machine import device_notes, mps_bf16_check, mps_memory_note
from ddpmctl.runtime import generator_device, release_cached_memory, resolve_precision

MPS, CPU = torch.device("mps"), torch.device("cpu")  # a device object only: nothing runs on it here


# ----------------------------------------------------------------------------- notes at the start of training


def test_training_on_mps_says_which_memory_limit_is_in_force():
    unset = mps_memory_note({})
    assert "PYTORCH_MPS_HIGH_WATERMARK_RATIO is unset" in unset and "1.7" in unset and "swaps" in unset
    assert "fails with 'MPS backend out of memory'" in mps_memory_note({"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "1.0"})
    assert "swaps" in mps_memory_note({"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "1.5"})
    assert "freeze macOS" in mps_memory_note({"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0"})  # the problem, not a limit
    notes = device_notes(Config(), MPS, {})
    assert notes == [unset]  # one line, and nothing else with the defaults


def test_mps_fallback_channels_last_and_compile_are_named_on_mps_only():
    cfg = apply_overrides(Config(), {"channels_last": True, "compile": True})
    notes = " | ".join(device_notes(cfg, MPS, {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}))
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in notes and "runs on the CPU" in notes
    assert "--channels-last is used on CUDA only" in notes and "MPS" in notes
    assert "--compile on MPS" in notes
    assert "FALLBACK" not in " ".join(device_notes(cfg, MPS, {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}))
    cpu = device_notes(cfg, CPU, {"PYTORCH_ENABLE_MPS_FALLBACK": "1"})
    assert cpu == ["--channels-last is used on CUDA only; training on cpu in NCHW"]
    assert device_notes(Config(), CPU, {}) == [] and device_notes(cfg, torch.device("cuda"), {}) == []


def test_precision_on_mps_is_fp32_unless_asked_and_bf16_says_what_it_costs(monkeypatch):
    assert resolve_precision("auto", MPS).name == "fp32"
    monkeypatch.setattr(runtime, "mps_supports_bf16", lambda: True)
    monkeypatch.setattr(runtime, "mac_chip", lambda: "Apple M1 Pro")
    bf16 = resolve_precision("bf16", MPS)
    assert bf16.name == "bf16" and "Apple M1 GPU is emulated" in bf16.note
    monkeypatch.setattr(runtime, "mac_chip", lambda: "Apple M3 Max")
    assert "can run slower than fp32" in resolve_precision("bf16", MPS).note
    monkeypatch.setattr(runtime, "mps_supports_bf16", lambda: False)  # macOS 13, or an old torch
    fp32 = resolve_precision("bf16", MPS)
    assert fp32.name == "fp32" and "macOS 14" in fp32.note


def test_the_chip_and_macos_version_are_read_from_sysctl_and_mac_ver(monkeypatch):
    assert host.apple_generation("Apple M2 Max") == 2 and host.apple_generation("Apple M10") == 10
    assert host.apple_generation("Intel(R) Core(TM) i9") is None and host.apple_generation(None) is None
    assert host.macos_major("13.6.1") == 13 and host.macos_major("") is None
    asked = []
    monkeypatch.setattr(host, "command_output", lambda cmd: asked.append(cmd) or "Apple M4 Pro")
    monkeypatch.setattr(host.platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    monkeypatch.setattr(host.sys, "platform", "linux")
    assert host.mac_chip() is None and host.macos_version() is None and not asked  # not a Mac: nothing asked
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert host.mac_chip() == "Apple M4 Pro" and host.macos_version() == "15.1"
    assert asked == [["sysctl", "-n", "machdep.cpu.brand_string"]]
    assert "macOS 14" in mps_bf16_check("Apple M3", "13.6").detail
    assert "Apple M2 GPU is emulated" in mps_bf16_check("Apple M2", "14.5").detail


# ----------------------------------------------------------------------------- seeded noise


def test_seeded_noise_for_mps_comes_from_cpu_generators():
    assert generator_device(MPS) == CPU and generator_device(CPU) == CPU
    assert generator_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # CUDA's own repeats
    gens = step_generators(7, 3, 2, MPS)
    assert all(g.device == CPU for g in gens)
    same = step_generators(7, 3, 2, CPU)
    assert all(torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b)) for a, b in zip(gens, same, strict=True))


class _RecordingTorch:
    """sampling's ``torch`` with each randn's device recorded."""

    def __init__(self) -> None:
        self.devices: list[object] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *args, device=None, **kwargs):
        self.devices.append(torch.device(device))
        return torch.randn(*args, device=device, **kwargs)


def test_per_step_noise_is_drawn_on_the_generators_device_then_moved(monkeypatch):
    recorder = _RecordingTorch()
    monkeypatch.setattr(sampling, "torch", recorder)
    x = torch.empty(2, 3, 4, 4, device="meta")  # stands in for an MPS tensor: not where the draws happen
    noise = sampling.randn_like_batch(x, step_generators(0, 0, 2, MPS))
    assert noise.device == x.device and noise.shape == x.shape and recorder.devices == [CPU, CPU]
    single = sampling.randn_like_batch(x, torch.Generator().manual_seed(1))
    assert single.device == x.device and recorder.devices[-1] == CPU
    monkeypatch.undo()
    cpu_x = torch.empty(2, 3, 4, 4)
    expected = torch.stack([torch.randn((3, 4, 4), generator=g) for g in step_generators(0, 0, 2, CPU)])
    assert torch.equal(sampling.randn_like_batch(cpu_x, step_generators(0, 0, 2, MPS)), expected)


# ----------------------------------------------------------------------------- memory between phases


def test_cached_memory_is_released_on_mps_and_after_every_grid(monkeypatch, tmp_path: Path, tiny_images: Path):
    emptied = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    release_cached_memory(MPS)
    release_cached_memory(CPU)
    assert emptied == ["mps"]

    from ddpmctl import config as config_mod
    from ddpmctl import engine

    released = []
    monkeypatch.setattr(engine, "release_cached_memory", lambda device: released.append(device.type))
    cfg = config_mod.resolve(None, {
        "experiment_name": "grids", "working_directory": str(tmp_path / "w"), "generated_directory": str(tmp_path / "g"),
        "path_to_data": str(tiny_images), "img_size": 16, "starting_channels": 8, "channel_multipliers": "1,2",
        "attention_resolutions": "8", "num_heads": 2, "num_diffusion_timesteps": 20, "num_training_steps": 4,
        "batch_size": 8, "evaluation_interval": 2, "num_workers": 0, "num_generations": 1, "sampler": "ddim",
        "sampling_steps": 2, "device": "cpu"})
    engine.train(cfg)
    assert released == ["cpu", "cpu"]  # after each of the two grids


# ----------------------------------------------------------------------------- DataLoader workers under spawn


def test_loader_workers_started_by_spawn_give_the_same_batches(tiny_images: Path):
    """macOS starts workers with spawn: the dataset is pickled into each and ddpmctl imported afresh."""
    dataset, _ = build_dataset(tiny_images, 16)
    batches = {}
    for workers, context in ((0, None), (1, "spawn")):
        stream = BatchStream(dataset, batch_size=24, num_workers=workers, pin_memory=False, seed=3,
                             multiprocessing_context=context)
        try:
            batches[workers] = [next(stream) for _ in range(4)]  # 64 images: an epoch boundary and a short batch
            state = stream.state_dict()
        finally:
            stream.close()
    assert [b.shape[0] for b in batches[1]] == [24, 24, 16, 24]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1], strict=True))
    assert state == {"epoch": 1, "position": 24, "seed": 3}



def test_torchrun_on_a_mac_is_one_clear_error(monkeypatch):
    """torch.distributed has no MPS backend (gloo cannot all-reduce MPS tensors, NCCL needs CUDA)."""
    from ddpmctl.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("auto", "mps"):
        with pytest.raises(ConfigError, match="torchrun needs CUDA GPUs or --device cpu"):
            runtime.init_distributed(device)
