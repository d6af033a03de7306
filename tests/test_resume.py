"""Resuming: bit-exact continuation, kill -9 at any moment, Ctrl-C, the NaN guard, and resume errors.

Tiny runs on the CPU: 10 images of 8 px, batch 4, so an epoch is 3 steps (4 + 4 + 2 images) and both
epoch boundaries and mid-epoch stops are a few steps away. Everything runs on one thread, in this
process and in the subprocesses alike, so that weights can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddpmctl import checkpoints as ck
from ddpmctl import config as config_mod
from ddpmctl import diffusion, layout, rundir
from ddpmctl.cli.main import app
from ddpmctl.demo_data import make_demo_dataset
from ddpmctl.engine import Note, StepStats, StopFlag, TrainFinished, train
from ddpmctl.errors import TrainingStopped

runner = CliRunner()
STEPS = 12  # 4 epochs of 3 steps



@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("resume_images"), num_images=10, size=8, seed=3)


def options(data: Path, work: Path, name: str, steps: int = STEPS, **extra: object) -> dict[str, object]:
    opts: dict[str, object] = {
        "experiment_name": name, "working_directory": str(work / "w"), "generated_directory": str(work / "g"),
        "device": "cpu", "seed": 7, "img_size": 8, "starting_channels": 8, "channel_multipliers": "1,2",
        "attention_resolutions": "4", "num_heads": 2, "bottleneck_blocks": 1, "num_diffusion_timesteps": 20,
        "path_to_data": str(data), "num_workers": 0, "num_training_steps": steps, "batch_size": 4,
        "warmup_steps": 2, "learning_rate": 1e-3, "ema_decay": 0.9, "evaluation_interval": 4,
        "num_generations": 1, "plot_freq_interval": 10, "sampler": "ddim", "sampling_steps": 2, "log_interval": 1,
        "num_keep_checkpoints": 3,
    }
    opts.update(extra)
    return opts


def as_args(opts: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in opts.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def weights(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(checkpoint / name)) for name in (ck.MODEL, ck.EMA)}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        different = [k for k in wa[name] if not torch.equal(wa[name][k], wb[name][k])]
        assert not different, f"{name}: {len(different)} tensors differ between {a} and {b}"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def stop_at(step: int, signum: int | None = None) -> tuple[Callable[[object], None], StopFlag]:
    """An event callback that asks for a stop once ``step`` is done: a real signal to this process, or
    (without ``signum``) straight through the flag Ctrl-C sets."""
    flag = StopFlag()

    def on_event(event: object) -> None:
        if isinstance(event, StepStats) and event.step == step:
            if signum is None:
                flag.request("test")
            else:
                os.kill(os.getpid(), signum)

    return on_event, flag


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: STEPS steps in one go."""
    work = tmp_path_factory.mktemp("straight")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config_mod.resolve(None, options(data, work, "straight")))
    finally:
        torch.set_num_threads(before)
    return work / "w" / "straight"


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize(("stop", "workers", "signum"), [(5, 0, None), (6, 0, signal.SIGTERM), (4, 1, None)],
                         ids=["mid-epoch", "epoch-boundary-sigterm", "mid-epoch-1-worker"])
def test_stop_and_resume_is_bit_identical(
    data: Path, tmp_path: Path, straight: Path, stop: int, workers: int, signum: int | None
) -> None:
    opts = options(data, tmp_path, "split", num_workers=workers)
    on_event, flag = stop_at(stop, signum)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        train(config_mod.resolve(None, opts), on_event, flag)
    assert signal.getsignal(signal.SIGTERM) is handler  # the engine put the previous handler back
    assert stopped.value.exit_code == 130 and stopped.value.checkpoint.endswith(f"checkpoint_{stop}")
    assert f"interrupted ({'SIGTERM' if signum else 'test'}) at step {stop}" in str(stopped.value)
    meta = ck.read_meta(Path(stopped.value.checkpoint))
    assert meta["data_state"]["ranks"][0]["epoch"] == stop // 3 - (stop % 3 == 0)  # the epoch it was in
    train(config_mod.resolve(None, {**opts, "resume_from_checkpoint": "latest"}))
    run = tmp_path / "w" / "split"
    assert_same_weights(run / f"checkpoint_{STEPS}", straight / f"checkpoint_{STEPS}")
    assert losses(run) == losses(straight)  # no batch replayed or skipped, same noise and timesteps


@pytest.mark.parametrize("first", [True, False], ids=["checkpointing-throughout", "turned-on-at-resume"])
def test_gradient_checkpointing_resumes_bit_identical_to_a_run_without_it(
    data: Path, tmp_path: Path, straight: Path, first: bool
) -> None:
    """It changes neither the weights nor what a checkpoint holds: a resume may turn it on (it is not another
    model), and the run ends bit for bit where the run without it did."""
    opts = options(data, tmp_path, "ckpt", gradient_checkpointing=first)
    on_event, flag = stop_at(5)
    with pytest.raises(TrainingStopped):
        train(config_mod.resolve(None, opts), on_event, flag)
    resumed = config_mod.resolve_for_resume(None, {"experiment_name": "ckpt", "working_directory": str(tmp_path / "w"),
                                                   "gradient_checkpointing": None if first else True})
    assert resumed.training.gradient_checkpointing  # from config.yaml, or given at resume
    train(resumed)
    run = tmp_path / "w" / "ckpt"
    assert_same_weights(run / f"checkpoint_{STEPS}", straight / f"checkpoint_{STEPS}")
    assert losses(run) == losses(straight)


def test_resume_cli_needs_only_name_and_folder_and_extends_with_more_steps(
    data: Path, tmp_path: Path, straight: Path
) -> None:
    opts = options(data, tmp_path, "cli", num_training_steps=STEPS)
    on_event, flag = stop_at(8)
    with pytest.raises(TrainingStopped):
        train(config_mod.resolve(None, opts), on_event, flag)
    where = ["--experiment-name", "cli", "--working-directory", str(tmp_path / "w")]
    result = runner.invoke(app, ["resume", *where])
    assert result.exit_code == 0, result.output
    assert "resuming at step 8 of 12" in result.output
    run = tmp_path / "w" / "cli"
    assert_same_weights(run / f"checkpoint_{STEPS}", straight / f"checkpoint_{STEPS}")

    result = runner.invoke(app, ["resume", *where, "--num-training-steps", "14"])
    assert result.exit_code == 0, result.output
    assert "resuming at step 12 of 14" in result.output
    assert rundir.resolve_checkpoint(run)[0].name == "checkpoint_14"
    assert [s for s, _ in losses(run)] == list(range(1, 15))
    assert config_mod.load_yaml(run / "config.yaml").training.num_training_steps == 14

    # The seed's spelling does the same: train --resume-from-checkpoint (the config comes from the run).
    result = runner.invoke(app, ["train", *where, "--resume_from_checkpoint", "checkpoint_14",
                                 "--num-training-steps", "15"])
    assert result.exit_code == 0, result.output
    assert "resuming at step 14 of 15" in result.output and (run / "checkpoint_15").is_dir()

    result = runner.invoke(app, ["resume", *where])  # nothing left to do: says so, changes nothing
    assert result.exit_code == 0, result.output
    assert "checkpoint_15 is at step 15 already" in " ".join(result.output.split())
    assert "lastcheckpoint" + str(run / "checkpoint_15") in "".join(result.output.split())


def test_resume_applies_a_new_learning_rate_and_weight_decay(data: Path, tmp_path: Path) -> None:
    """The optimizer state a checkpoint restores carries the old peak rate and decay: options given win."""
    train(config_mod.resolve(None, options(data, tmp_path, "lr", num_training_steps=4)))
    where = ["--experiment-name", "lr", "--working-directory", str(tmp_path / "w")]
    result = runner.invoke(app, ["resume", *where, "--num-training-steps", "6", "--learning-rate", "1e-4",
                                 "--weight-decay", "0.05"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "learning rate 0.001 -> 0.0001 from here on" in text and "weight decay 0.0001 -> 0.05" in text
    # The rates logged after the resume are those of a run with the new peak and length from the start.
    train(config_mod.resolve(None, options(data, tmp_path, "ref", num_training_steps=6, learning_rate=1e-4)))
    logged = {name: {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "w" / name / "metrics.jsonl").open())}
              for name in ("lr", "ref")}
    assert [logged["lr"][s] for s in (5, 6)] == pytest.approx([logged["ref"][s] for s in (5, 6)], rel=1e-12)
    state = ck.load_training_state(tmp_path / "w" / "lr" / "checkpoint_6")
    assert state["scheduler"]["base_lrs"] == [1e-4]
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.05}


def test_resume_from_an_older_checkpoint_sets_the_newer_branch_aside(
    data: Path, tmp_path: Path, straight: Path
) -> None:
    run = tmp_path / "w" / "branch"
    shutil.copytree(straight, run)  # checkpoint_4, _8 and _12
    notes: list[str] = []
    opts = options(data, tmp_path, "branch", num_training_steps=5, resume_from_checkpoint="checkpoint_4")
    train(config_mod.resolve_for_resume(None, opts), lambda e: notes.extend(getattr(e, "notes", [])))
    aside = run / layout.ABANDONED
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_12", "checkpoint_8"]
    assert any("checkpoint_8, checkpoint_12 moved to" in n and str(aside) in n for n in notes), notes
    assert [c.name for c in rundir.list_checkpoints(run)] == ["checkpoint_4", "checkpoint_5"]
    assert rundir.resolve_checkpoint(run) == (run / "checkpoint_5", [])  # 'latest' is the new branch
    assert_same_weights(aside / "checkpoint_12", straight / "checkpoint_12")  # kept, untouched


def test_resume_falls_back_from_a_truncated_checkpoint_with_a_note(data: Path, tmp_path: Path) -> None:
    opts = options(data, tmp_path, "fallback", num_training_steps=8)
    train(config_mod.resolve(None, opts))
    run = tmp_path / "w" / "fallback"
    with open(run / "checkpoint_8" / ck.EMA, "r+b") as fh:
        fh.truncate(10)
    where = ["--experiment-name", "fallback", "--working-directory", str(tmp_path / "w")]
    result = runner.invoke(app, ["resume", *where])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "checkpoint_8 is damaged: ema.safetensors is truncated" in text and "using checkpoint_4" in text
    assert "resuming at step 4 of 8" in text
    assert ck.inspect_checkpoint(run / "checkpoint_8", verify_hashes=True).complete  # rewritten whole


# ----------------------------------------------------------------------------- errors


def test_resume_error_messages(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    result = runner.invoke(app, ["resume", "--experiment-name", "ghost", "--working-directory", str(work)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no run to resume" in result.output and "does not exist" in " ".join(result.output.split())

    # A run that stopped before its first checkpoint.
    opts = options(data, tmp_path, "early", num_training_steps=8)
    on_event, flag = stop_at(2)
    with pytest.raises(TrainingStopped):
        train(config_mod.resolve(None, opts), on_event, flag)
    shutil.rmtree(work / "early" / "checkpoint_2")  # as if killed before the save
    where = ["--experiment-name", "early", "--working-directory", str(work)]
    result = runner.invoke(app, ["resume", *where, "--num-training-steps", "4"])  # nothing saved: it starts over
    assert result.exit_code == 0, result.output
    assert "early has no checkpoint yet (it stopped before its first save): starting from step 0" in (
        " ".join(result.output.split()))
    assert [s for s, _ in losses(work / "early")] == [1, 2, 3, 4]  # the first attempt's rows are gone

    result = runner.invoke(app, ["resume", "--experiment-name", "ghost", "--working-directory", str(work)])
    assert result.exit_code == 1 and f"runs in {work}: early" in " ".join(result.output.split())
    result = runner.invoke(app, ["resume", *where, "--resume-from-checkpoint", "checkpoint_99"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "checkpoint_99 not found" in text and "it holds: checkpoint_4" in text

    result = runner.invoke(app, ["train", *as_args({**opts, "num_training_steps": 4})])  # a second fresh start
    assert result.exit_code == 1 and "already holds checkpoint_4" in " ".join(result.output.split())


# ----------------------------------------------------------------------------- NaN guard


def test_nan_guard_skips_counts_and_stops(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = diffusion.loss_fn
    calls = {"n": 0}
    bad: set[int] = set()

    def loss_fn(pred, target, kind):
        calls["n"] += 1
        loss = real_loss(pred, target, kind)
        return loss * float("nan") if calls["n"] in bad else loss

    monkeypatch.setattr(diffusion, "loss_fn", loss_fn)
    bad.update({3, 4})  # two in a row (under max_bad_steps=3): skipped and counted, training goes on
    finished: list[TrainFinished] = []
    opts = options(data, tmp_path, "nan", num_training_steps=6, max_bad_steps=3)
    train(config_mod.resolve(None, opts), lambda e: finished.append(e) if isinstance(e, TrainFinished) else None)
    assert finished[0].step == 6 and finished[0].skipped_steps == 2
    run = tmp_path / "w" / "nan"
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoint_6" / ck.MODEL)).values())

    calls["n"] = 0
    bad.clear()
    bad.update(range(3, 100))  # resumed at step 6: steps 7 and 8 are fine, then every step is NaN
    opts = {**opts, "num_training_steps": 20, "resume_from_checkpoint": "latest", "evaluation_interval": 8}
    notes: list[str] = []
    with pytest.raises(TrainingStopped) as stopped:
        train(config_mod.resolve(None, opts), lambda e: notes.append(e.text) if isinstance(e, Note) else None)
    message = str(stopped.value)
    # Skipped steps count as steps (on every device), read back at each report (here every step).
    assert "training diverged: 3 non-finite steps in a row at step 11" in message  # the step its notes name
    assert "last good checkpoint" in message and message.endswith("checkpoint_8")
    assert [n for n in notes if "update skipped" in n] == [
        f"step {s}: 1 non-finite loss or gradient, update skipped ({i} in a row now)" for s, i in ((9, 1), (10, 2), (11, 3))]
    assert ck.inspect_checkpoint(run / "checkpoint_8", verify_hashes=True).complete
    assert rundir.resolve_checkpoint(run)[0].name == "checkpoint_8"


# ----------------------------------------------------------------------------- real processes

RUNNER = """
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from ddpmctl import checkpoints
slow = Path(os.environ["SLOW_SAVE_MARKER"])
real_fsync = checkpoints.fsync_file
def fsync(path):
    if slow.exists():  # the test wants to catch a save in the middle
        time.sleep(3.0)
    real_fsync(path)
checkpoints.fsync_file = fsync
step_delay = float(os.environ.get("SLOW_STEP", "0"))
if step_delay:
    from ddpmctl import step
    real_step = step.TrainStep.micro_batch
    def micro_batch(self, batch, accumulating=False, rows=None):
        time.sleep(step_delay)
        return real_step(self, batch, accumulating, rows)
    step.TrainStep.micro_batch = micro_batch
from ddpmctl.cli.main import main
sys.argv = ["ddpmctl", *sys.argv[1:]]
main()
"""


class Trainer:
    """``ddpmctl`` in a subprocess of its own process group (as a terminal runs it)."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None = None):
        script = tmp / "runner.py"
        script.write_text(RUNNER)
        self.slow = tmp / "slow_save"
        self.log = tmp / f"log-{time.monotonic_ns()}.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_SAVE_MARKER": str(self.slow), "COLUMNS": "200", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, str(script), *args], stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"gave up waiting for {what}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def saving(self, run: Path) -> bool:
        """Whether this process has a checkpoint half written."""
        return any(n.startswith(".tmp-checkpoint_") and n.endswith(f"-{self.proc.pid}") for n in scratch(run))

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # the whole group, DataLoader workers too, like a terminal

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"did not exit:\n{self.log.read_text()[-3000:]}")
        return code, self.log.read_text()


def logged_step(run: Path) -> int:
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    try:
        return json.loads(rows[-1])["step"] if rows else 0
    except ValueError:
        return 0


def scratch(run: Path) -> list[str]:
    return [p.name for p in run.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_kill_9_at_random_moments_then_resume_is_exact(data: Path, tmp_path: Path, straight: Path) -> None:
    # Checkpoints every 2 steps (the reference saved every 4: saving must not change the training either).
    opts = options(data, tmp_path, "killed", evaluation_interval=2, num_keep_checkpoints=2)
    run = tmp_path / "w" / "killed"
    rng = random.Random(20240611)
    where = ["--experiment-name", "killed", "--working-directory", str(tmp_path / "w")]
    slow_steps = {"SLOW_STEP": "0.1"}  # a wider window to kill in: each step takes 0.1 s longer

    # 1: killed at a random moment after the first checkpoint.
    proc = Trainer(tmp_path, ["train", *as_args(opts)], slow_steps)
    proc.wait_for(lambda: (run / "checkpoint_2").is_dir(), "the first checkpoint")
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()

    # 2: killed in the middle of writing a checkpoint (saves are slowed down so we cannot miss one).
    proc = Trainer(tmp_path, ["resume", *where], slow_steps)
    proc.slow.touch()
    proc.wait_for(lambda: proc.saving(run), "a save to start")
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.slow.unlink()
    assert proc.saving(run), "the kill was meant to hit a save"
    assert all(c.complete for c in rundir.list_checkpoints(run)), "a half-written checkpoint became visible"

    # 3: killed at a random moment again.
    before = logged_step(run)  # rows past the newest checkpoint are dropped when the resume starts
    proc = Trainer(tmp_path, ["resume", *where], slow_steps)
    proc.wait_for(lambda: logged_step(run) > before, "training to go on")
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()

    # Resume to the end from the newest complete checkpoint: the same weights and losses as one run.
    newest = rundir.resolve_checkpoint(run)[0]
    cfg = config_mod.resolve_for_resume(None, {"experiment_name": "killed", "working_directory": str(tmp_path / "w")})
    assert train(cfg).step == STEPS
    assert not scratch(run), "scratch folders of the killed processes were not cleaned up"
    assert_same_weights(run / f"checkpoint_{STEPS}", straight / f"checkpoint_{STEPS}")
    assert losses(run) == losses(straight), f"loss sequence differs after resuming from {newest.name}"


def test_ctrl_c_saves_and_second_ctrl_c_exits_at_once(data: Path, tmp_path: Path) -> None:
    opts = options(data, tmp_path, "ctrlc", num_training_steps=100_000, evaluation_interval=10,
                   num_keep_checkpoints=2, num_workers=1)
    run = tmp_path / "w" / "ctrlc"

    proc = Trainer(tmp_path, ["train", *as_args(opts)])
    proc.wait_for(lambda: (run / "checkpoint_10").is_dir() and logged_step(run) > 12, "training")
    proc.interrupt()
    code, out = proc.finish()
    text = " ".join(out.split())
    assert code == 130, out
    stopped_at = logged_step(run)
    assert f"interrupted (Ctrl-C) at step {stopped_at}; saved" in text
    assert f"resume with: ddpmctl resume --experiment-name ctrlc --working-directory {tmp_path / 'w'}" in text
    assert "Traceback" not in out
    assert rundir.resolve_checkpoint(run) == (run / f"checkpoint_{stopped_at}", [])

    # Second run: Ctrl-C, then Ctrl-C again while the interrupt's checkpoint is being written.
    where = ["--experiment-name", "ctrlc", "--working-directory", str(tmp_path / "w")]
    proc = Trainer(tmp_path, ["resume", *where])
    proc.wait_for(lambda: logged_step(run) > stopped_at + 2, "training to go on")
    proc.slow.touch()
    proc.interrupt()
    first = time.monotonic()
    proc.wait_for(lambda: proc.saving(run), "the interrupt's save")
    time.sleep(max(0.0, 2.3 - (time.monotonic() - first)))  # a repeat within 2 s counts as torchrun's echo
    proc.interrupt()
    second = time.monotonic()
    code, out = proc.finish(timeout=30)
    # The interrupted save alone would take 12 s (4 files, 3 s each): the process did not wait for it.
    assert time.monotonic() - second < 8.0, "the second Ctrl-C did not stop at once"
    assert code == 130, out
    assert "stopped at once (second Ctrl-C)" in out and "resume with: ddpmctl resume" in out
    assert "Traceback" not in out
    assert not scratch(run), "the half-written checkpoint was left behind"
    assert all(ck.inspect_checkpoint(c.path, verify_hashes=True).complete for c in rundir.list_checkpoints(run))
    assert rundir.resolve_checkpoint(run)[0].name == f"checkpoint_{stopped_at}"


def test_loader_workers_leave_ctrl_c_to_the_main_process(data: Path) -> None:
    from ddpmctl.data import BatchStream, build_dataset

    dataset, _ = build_dataset(data, 8)
    stream = BatchStream(dataset, batch_size=4, num_workers=1, pin_memory=False, seed=0)
    try:
        next(stream)
        worker = stream._it._workers[0]
        os.kill(worker.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to every process of the group
        time.sleep(0.5)
        assert worker.is_alive(), "a loader worker died of Ctrl-C: its batch in flight would be lost"
        for _ in range(8):  # more batches than were prefetched: the worker still serves them
            next(stream)
    finally:
        stream.close()


def test_a_run_resumes_from_another_directory_with_the_paths_it_was_given(data: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative --path-to-data / --working-directory / --generated-directory are stored absolute in config.yaml."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    shutil.copytree(data, start / "imgs")
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    opts = options(Path("imgs"), Path("."), "rel", num_training_steps=4)
    opts.update(working_directory="w", generated_directory="g", path_to_data="imgs")
    args = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert runner.invoke(app, ["train", *args]).exit_code == 0
    saved = config_mod.load_yaml(start / "w" / "rel" / "config.yaml")
    assert saved.data.path_to_data == str(start / "imgs") and saved.run.generated_directory == str(start / "g")
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["resume", "--experiment-name", "rel", "--working-directory", "../start/w",
                                 "--num-training-steps", "8"])
    assert result.exit_code == 0, result.output
    assert (start / "g" / "rel" / "step_8.png").is_file() and not (elsewhere / "g").exists()
    assert "data changed" not in result.output


def test_resuming_on_other_data_says_so_and_starts_a_new_epoch(data: Path, tmp_path: Path) -> None:
    train(config_mod.resolve(None, options(data, tmp_path, "data", num_training_steps=4)))
    other = make_demo_dataset(tmp_path / "other", num_images=7, size=8, seed=4)
    result = runner.invoke(app, ["resume", "--experiment-name", "data", "--working-directory", str(tmp_path / "w"),
                                 "--num-training-steps", "5", "--path-to-data", str(other)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"the data changed since checkpoint_4: {data} (10 images) then, {other} (7 images) now" in text
    assert "the data order restarts at the next epoch" in text


def test_a_checkpoint_that_passes_its_checksums_but_does_not_fit_is_a_one_line_error(data: Path, tmp_path: Path) -> None:
    """Files edited by hand (checksums recomputed): the loader refuses them in one line, nothing is lost."""
    from conftest import assert_one_line_error

    train(config_mod.resolve(None, options(data, tmp_path, "misfit", num_training_steps=4)))
    ckpt = tmp_path / "w" / "misfit" / "checkpoint_4"
    state = ck.load_training_state(ckpt)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"] * 2  # one group too many
    torch.save(state, ckpt / ck.STATE)
    meta = json.loads((ckpt / ck.META).read_text())
    meta["files"][ck.STATE] = {"size": (ckpt / ck.STATE).stat().st_size, "sha256": ck.sha256_file(ckpt / ck.STATE)}
    (ckpt / ck.META).write_text(json.dumps(meta))
    before = sorted(p.name for p in ckpt.iterdir())
    result = runner.invoke(app, ["resume", "--experiment-name", "misfit", "--working-directory", str(tmp_path / "w"),
                                 "--num-training-steps", "6"])
    assert_one_line_error(result, "checkpoint_4 does not fit this run (ValueError", "--resume-from-checkpoint")
    assert sorted(p.name for p in ckpt.iterdir()) == before
