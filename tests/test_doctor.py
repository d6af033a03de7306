"""ddpmctl doctor: fit arithmetic, OOM classification, the MPS path through a fake backend, the CPU child probe, --json."""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl import budget, doctor, machine
from ddpmctl.cli.main import app
from ddpmctl.config import Config, apply_overrides
from ddpmctl.cost import ModelCost, model_cost
from ddpmctl.doctor import Point, Probe
from ddpmctl.doctor_child import MpsBackend, classify_oom
from ddpmctl.machine import child_env, mps_watermark
from ddpmctl.memfit import BYTES_PER_PARAMETER, Fit, extrapolate, fit_line, limit_by_oom, recommend
from ddpmctl.runtime import build_model

MIB = 2**20
TINY = {"img_size": 16, "starting_channels": 8, "channel_multipliers": "1,2", "attention_resolutions": "8",
        "num_heads": 2, "num_diffusion_timesteps": 20, "device": "cpu"}


# ----------------------------------------------------------------------------- arithmetic


def test_fit_line_recovers_an_exact_line_and_least_squares():
    fit = fit_line([(1, 110.0), (2, 120.0), (4, 140.0)])
    assert fit.intercept == pytest.approx(100.0) and fit.slope == pytest.approx(10.0) and fit.points == 3
    noisy = fit_line([(1, 11.0), (2, 19.0), (3, 31.0), (4, 39.0)])  # y = 10x + 0 +- 1
    assert noisy.slope == pytest.approx(9.6) and noisy.intercept == pytest.approx(1.0)
    assert fit_line([(2, 5.0), (2, 6.0)]) is None and fit_line([]) is None


def test_max_batch_keeps_the_headroom_free():
    fit = Fit(intercept=100 * MIB, slope=10 * MIB, points=2, source="test")
    # 1000 MiB budget, 15% headroom: 850 MiB usable -> (850 - 100) / 10 = 75
    assert fit.max_batch(1000 * MIB, 0.15) == 75
    assert fit.max_batch(1000 * MIB, 0.0) == 90
    assert fit.max_batch(100 * MIB, 0.15) == 0  # the model alone does not fit
    assert fit.predict(75) <= 0.85 * 1000 * MIB < fit.predict(76)


def test_an_out_of_memory_point_bounds_the_answer_and_recommendation():
    points = [Point("fit", 4, False, 1, 1.0, 4.0), Point("verify", 30, True, None, None, None, "oom")]
    assert limit_by_oom(75, points) == 29 and limit_by_oom(10, points) == 10
    assert recommend(20, 64) == (16, 4)  # 16 x 4 = 64 with batch <= 20
    assert recommend(50, 64) == (32, 2)
    assert recommend(500, 64) == (64, 1)
    assert recommend(7, 64) == (7, 10)  # ceil(64 / 10) = 7: reaches 70 >= 64
    with pytest.raises(ValueError):
        recommend(0, 64)


def test_extrapolation_scales_slope_by_activations_and_speed_by_flops():
    measured = ModelCost(parameters=1000, activation_bytes=10 * MIB, flops=1e9)
    bigger = ModelCost(parameters=3000, activation_bytes=40 * MIB, flops=4e9)
    probe = Probe(16, 8, "cpu", "cpu", "fp32", None, 1000, budget_bytes=1000 * MIB, headroom=0.15, points=[],
                  fit=Fit(100 * MIB, 10 * MIB, 2, "test"), max_batch=75, images_per_sec=40.0, images_per_sec_batch=8,
                  largest_batch_bisected=None, seconds=0.0)
    max_batch, ips = extrapolate(probe.fit, probe.budget_bytes, probe.headroom, probe.images_per_sec, measured, bigger)
    intercept = 100 * MIB + BYTES_PER_PARAMETER * 2000
    assert max_batch == math.floor((850 * MIB - intercept) / (40 * MIB))
    assert ips == pytest.approx(10.0)


def test_model_cost_counts_activations_and_attention_kinds():
    cfg = apply_overrides(Config(), TINY)
    small = model_cost(cfg)
    double = model_cost(apply_overrides(cfg, {"img_size": 32, "attention_resolutions": "16"}))
    assert small.parameters == sum(p.numel() for p in build_model(cfg).parameters())
    assert 3.5 < double.activation_bytes / small.activation_bytes < 4.5  # activations grow with H x W
    assert 4.0 < double.flops / small.flops < 16.0  # convolutions x4, attention (N^2) x16
    # The MPS path spells attention out and keeps the N x N weights; fused kernels do not.
    assert model_cost(cfg, "math").activation_bytes > small.activation_bytes


# ----------------------------------------------------------------------------- OOM classification


MPS_MESSAGE = ("MPS backend out of memory (MPS allocated: 17.19 GB, other allocations: 1.30 GB, max allowed: 18.13 GB). "
               "Tried to allocate 1.00 GB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
               "limit for memory allocations (may cause system failure).")


def test_oom_classification_for_cuda_mps_and_cpu_messages():
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB")
    assert classify_oom(cuda) == "cuda"
    assert classify_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")) == "cuda"
    assert classify_oom(RuntimeError(MPS_MESSAGE)) == "mps"
    assert classify_oom(torch.OutOfMemoryError(MPS_MESSAGE)) == "mps"
    assert classify_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                     "you tried to allocate 68719476736 bytes")) == "cpu"
    assert classify_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x4)")) is None
    assert classify_oom(ValueError("out of memory")) is None  # only runtime errors come from allocators


def test_child_env_sets_the_mps_watermark_never_to_zero():
    env = child_env("mps", {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.0", "PYTORCH_MPS_LOW_WATERMARK_RATIO": "1.4"})
    assert env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"] == "1.0"
    assert float(env["PYTORCH_MPS_LOW_WATERMARK_RATIO"]) <= 1.0  # torch refuses low > high
    assert "PYTORCH_MPS_HIGH_WATERMARK_RATIO" not in child_env("cpu", {})
    assert mps_watermark({"PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0"})[1] is not None
    assert mps_watermark({})[1] is None and "1.7" in mps_watermark({})[0]


# ----------------------------------------------------------------------------- the MPS path, through a fake


class FakeMps(MpsBackend):
    """The real MpsBackend with the four torch.mps calls replaced: memory = BASE + PER_IMAGE * batch, on the CPU
    (PER_IMAGE_CHECKPOINTED with --gradient-checkpointing).

    Like the real allocator it raises "MPS backend out of memory" past PYTORCH_MPS_HIGH_WATERMARK_RATIO x the
    recommended maximum, and (like fragmentation would) also above HIDDEN_LIMIT images without checkpointing.
    """

    BASE, PER_IMAGE, PER_IMAGE_CHECKPOINTED, RECOMMENDED, HIDDEN_LIMIT = 100 * MIB, 10 * MIB, 4 * MIB, 400 * MIB, 20

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self.batch, self.checkpointing = 0, False

    def recommended_max(self) -> int:
        return self.RECOMMENDED

    def driver_allocated(self) -> int:
        return self.BASE + (self.PER_IMAGE_CHECKPOINTED if self.checkpointing else self.PER_IMAGE) * self.batch

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def begin_step(self, batch: int, checkpointing: bool = False) -> None:
        self.batch, self.checkpointing = batch, checkpointing

    def sample(self) -> None:
        limit = float(os.environ["PYTORCH_MPS_HIGH_WATERMARK_RATIO"]) * self.RECOMMENDED
        if self.driver_allocated() > limit or (self.batch > self.HIDDEN_LIMIT and not self.checkpointing):
            raise RuntimeError(MPS_MESSAGE)
        super().sample()


def test_fake_mps_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = apply_overrides(Config(), TINY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTORCH_MPS_HIGH_WATERMARK_RATIO", None)
    monkeypatch.setattr(machine, "mac_chip", lambda: "Apple M2 Max")  # what sysctl would say on that Mac
    monkeypatch.setattr(machine, "macos_version", lambda: "14.6.1")
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    report = doctor.run_doctor(cfg, img_sizes=(16,), channels=(8, 16), backend_ref="test_doctor:FakeMps", env=env)
    probe = report.probe
    assert probe.backend == "mps" and probe.budget_bytes == FakeMps.RECOMMENDED
    assert not any("CUDA graph" in n for n in probe.notes)  # that caveat is for CUDA's eager probe only
    assert probe.details["probe_high_watermark_ratio"] == "1.0"  # set in the child only
    fit_points = [p for p in probe.points if p.phase == "fit"]
    assert [p.batch for p in fit_points] == [1, 2, 4, 8, 16]  # stops once the peak passes half the budget
    assert probe.fit.slope == pytest.approx(FakeMps.PER_IMAGE) and probe.fit.intercept == pytest.approx(FakeMps.BASE)
    # Predicted (400 * 0.85 - 100) / 10 = 24 -> out of memory there (a data point, not a crash) -> 23, verified at 20.
    oom = [p for p in probe.points if p.oom]
    assert [p.batch for p in oom] == [24] and "MPS backend out of memory" in oom[0].error
    assert any(p.phase == "verify" and p.batch == 20 and not p.oom for p in probe.points)
    assert probe.max_batch == 23
    assert report.recommendation.batch_size * report.recommendation.gradient_accumulation_steps >= 64
    assert report.recommendation.batch_size <= 23
    assert "--gradient-checkpointing" not in report.recommendation.command
    # The checkpointed step, at the plain fit's two largest batches: its own line, (400 * 0.85 - 100) / 4 = 60.
    assert [p.batch for p in probe.points if p.phase == "checkpointing"] == [8, 16]
    assert probe.fit_checkpointing.slope == pytest.approx(FakeMps.PER_IMAGE_CHECKPOINTED)
    assert probe.max_batch_checkpointing == 60
    # 23 < the effective batch 64: checkpointing is suggested, 2 steps of 32 instead of 3 of 22.
    ckpt = report.recommendation_checkpointing
    assert (ckpt.batch_size, ckpt.gradient_accumulation_steps) == (32, 2) and "--gradient-checkpointing" in ckpt.command
    recipe = shlex.join(budget.recipe_options(report.recommendation.num_training_steps))
    assert report.recommendation.command.endswith(recipe)  # no config file given: the benchmark's recipe
    assert any("only 23 image(s) fit per step without checkpointing" in n and "with --gradient-checkpointing 60 fit" in n
               for n in report.notes)
    assert report.environment.backend == "mps"
    mps = report.environment.mps
    assert mps["recommended_max_bytes"] == FakeMps.RECOMMENDED
    assert "unset" in mps["high_watermark_ratio"]  # the caller's own setting is reported
    assert (mps["chip"], mps["chip_generation"], mps["macos"]) == ("Apple M2 Max", 2, "14.6.1")
    checks = {c.name: c for c in report.environment.checks}
    assert "Apple M2 GPU is emulated" in checks["MPS bf16"].detail
    assert checks["MPS fallback"].status == "warn" and "PYTORCH_ENABLE_MPS_FALLBACK=1" in checks["MPS fallback"].detail
    cells = {(c.img_size, c.starting_channels): c for c in report.table}
    assert cells[(16, 8)].measured and not cells[(16, 16)].measured
    assert cells[(16, 8)].max_batch_checkpointing == 60
    assert 0 < cells[(16, 16)].max_batch < 23  # wider model: fewer images fit
    assert cells[(16, 16)].max_batch < cells[(16, 16)].max_batch_checkpointing < 60


# ----------------------------------------------------------------------------- the CPU child probe and --json


def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  channel_multipliers: [1, 2]\n  attention_resolutions: [8]\n  num_heads: 2\n"
                    "diffusion:\n  num_diffusion_timesteps: 20\nrun:\n  device: cpu\n")
    return path


def test_json_runs_a_real_cpu_probe_in_a_child(tmp_path: Path):
    result = CliRunner().invoke(app, ["doctor", "--config", str(tiny_yaml(tmp_path)), "--img-size", "16",
                                      "--starting-channels", "8", "--num-training-steps", "1000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # exactly one JSON object
    assert data["schema"] == doctor.SCHEMA_VERSION and data["mode"] == "quick" and data["seconds"] > 0
    env = data["environment"]
    for key in ("os", "python", "torch", "ddpmctl", "cpu_cores", "ram_available_bytes", "cuda", "mps",
                "torch_compile", "dataloader", "checks"):
        assert key in env
    assert env["dataloader"]["pin_memory"] is False
    probe = data["probe"]
    assert probe["backend"] == "cpu" and probe["precision"] == "fp32" and probe["budget_bytes"] > 2**30
    fit_points = [p for p in probe["points"] if p["phase"] == "fit" and not p["oom"]]
    assert len(fit_points) >= 2 and all(p["peak_bytes"] > 0 and p["images_per_sec"] > 0 for p in fit_points)
    assert probe["fit"]["slope"] > 0 and probe["max_batch"] > 64
    assert data["table"] == [{"img_size": 16, "starting_channels": 8, "parameters": probe["parameters"],
                              "max_batch": probe["max_batch"], "images_per_sec": probe["images_per_sec"],
                              "measured": True, "source": "measured",
                              "max_batch_checkpointing": probe["max_batch_checkpointing"],
                              "images_per_sec_checkpointing": probe["images_per_sec_checkpointing"]}]
    assert len([p for p in probe["points"] if p["phase"] == "checkpointing" and not p["oom"]]) == 2
    assert data["recommendation_checkpointing"] is None  # the plain batch reaches the effective batch already
    rec = data["recommendation"]
    assert rec["batch_size"] == 64 and rec["gradient_accumulation_steps"] == 1 and rec["num_training_steps"] == 1000
    assert "--batch-size 64 --gradient-accumulation-steps 1" in rec["command"] and rec["estimated_seconds"] > 0


def test_bad_headroom_is_one_error_line(tmp_path: Path):
    result = CliRunner().invoke(app, ["doctor", "--img-size", "16", "--headroom", "1.5", "--device", "cpu"])
    assert result.exit_code == 1
    assert "Error: --headroom must be in [0, 1)" in result.output and "Traceback" not in result.output
