"""One process per run (the run lock), rank 0 alone choosing the checkpoint, torchrun on MPS refused,
and unwritable folders as one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, tiny_args
from typer.testing import CliRunner

from ddpmctl import checkpoints as ck
from ddpmctl import config as config_mod
from ddpmctl import engine, layout, prune, run_state, rundir, runlock, runtime
from ddpmctl.cli.main import app
from ddpmctl.errors import CheckpointError, ConfigError
from ddpmctl.runtime import DistInfo

runner = CliRunner()



@pytest.fixture
def fake_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A run folder as training leaves it (config.yaml, checkpoint_1 and checkpoint_2), without training."""
    work = tmp_path / "working"
    cfg = config_mod.resolve(None, {"experiment_name": "fake", "working_directory": str(work)})
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    for step in (1, 2):
        ck.save_checkpoint(run, step, {"w": torch.zeros(1)}, {}, {})
    return run, ["--experiment-name", "fake", "--working-directory", str(work)]


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"%d\\n" % os.getpid())
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_run_in_use_is_refused_with_the_owners_pid_until_it_dies(fake_run) -> None:
    run, where = fake_run
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / layout.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["resume", *where, "--num-training-steps", "3"])
        assert_one_line_error(result, f"run {run} is in use by another ddpmctl process (pid {holder.pid})")
        assert not (run / "checkpoint_3").exists()
        result = runner.invoke(app, ["checkpoints", "prune", str(run), "--keep", "1", "--yes"])
        assert_one_line_error(result, "is in use by another ddpmctl process")
        assert (run / "checkpoint_1").is_dir()
        dry = runner.invoke(app, ["checkpoints", "prune", str(run), "--keep", "1", "--dry-run"])
        assert dry.exit_code == 0 and "nothing deleted" in dry.output  # looking is allowed
    finally:
        holder.kill()  # SIGKILL: the OS frees the lock
        holder.wait()
    result = runner.invoke(app, ["checkpoints", "prune", str(run), "--keep", "1", "--yes"])
    assert result.exit_code == 0, result.output
    assert [c.name for c in rundir.list_checkpoints(run)] == ["checkpoint_2"]


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_lock_is_held_by_training_and_released_however_it_ends(tmp_path, tiny_images, fake_run, monkeypatch):
    args = tiny_args(tiny_images, tmp_path, steps=1, img_size=8, attention_resolutions="4")
    run = tmp_path / "working" / "tiny"
    seen = []

    def spy(path, *_a, **_k):  # the first thing a run writes after its setup: the lock is held by then
        with pytest.raises(runlock.RunInUseError):
            runlock.RunLock(run).acquire()
        seen.append(path)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(engine, "write_text_atomic", spy)
    result = runner.invoke(app, ["train", *args])
    assert_one_line_error(result, f"cannot write {run / 'config.yaml'}: Permission denied")
    assert seen == [run / "config.yaml"]
    assert not run.exists()  # released after the error, and the folder this failed start made is gone

    other, _ = fake_run
    with runlock.RunLock(other):  # held in this process by someone else: refused too (flock is per open file)
        with pytest.raises(runlock.RunInUseError, match="in use by another ddpmctl process"):
            runlock.RunLock(other).acquire()
    monkeypatch.setattr(runlock, "fcntl", None)  # Windows: no locking, but everything still works
    with runlock.RunLock(other):
        runlock.RunLock(other).acquire()


def test_unwritable_working_directory_and_prune_errors_are_one_line(tmp_path, tiny_images, fake_run, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = tiny_args(tiny_images, tmp_path, steps=1, img_size=8, attention_resolutions="4",
                     working_directory=blocker / "work")
    result = runner.invoke(app, ["train", *args])
    assert_one_line_error(result, f"cannot create the run folder {blocker / 'work' / 'tiny'}",
                          "pass a --working-directory you can write to")

    run, _ = fake_run
    def denied(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(prune, "discard", denied)
    result = runner.invoke(app, ["checkpoints", "prune", str(run), "--keep", "1", "--yes"])
    assert_one_line_error(result, f"could not delete {run / 'checkpoint_1'}: Permission denied")


# ----------------------------------------------------------------------------- rank 0 chooses


def resume_point(tmp_path: Path, rank: int, which: str | None, lock: runlock.RunLock | None = None):
    cfg = config_mod.resolve(None, {"experiment_name": "r", "working_directory": str(tmp_path),
                                    "resume_from_checkpoint": which})
    lock = lock or runlock.RunLock(cfg.run_dir)
    return run_state.resume_point(cfg, DistInfo(rank=rank, world_size=2, host_group="HOST"), lock)


def test_only_rank_0_resolves_and_hashes_and_the_others_get_its_choice(tmp_path, monkeypatch) -> None:
    run = tmp_path / "r"
    ck.save_checkpoint(run, 3, {"w": torch.zeros(1)}, {}, {})
    sent: list = []

    def broadcast(box, src, group):
        assert src == 0 and group == "HOST"
        if sent:  # a non-zero rank receives what rank 0 sent
            box[0] = sent[-1]
        else:
            sent.append(box[0])

    monkeypatch.setattr(run_state.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(run_state.dist, "broadcast_object_list", broadcast)
    lock = runlock.RunLock(run)
    try:
        assert resume_point(tmp_path, 0, "latest", lock) == (run / "checkpoint_3", [])
        assert lock.held
    finally:
        lock.release()
    assert sent == [{"path": str(run / "checkpoint_3"), "notes": []}]

    def must_not(*_a, **_k):
        raise AssertionError("only rank 0 looks at the checkpoints")

    for name in ("resolve_checkpoint", "inspect_checkpoint", "clean_stale_temporaries", "list_checkpoints"):
        monkeypatch.setattr(rundir, name, must_not)
    monkeypatch.setattr(ck, "inspect_checkpoint", must_not)
    other_lock = runlock.RunLock(run)
    assert resume_point(tmp_path, 1, "latest", other_lock) == (run / "checkpoint_3", [])
    assert not other_lock.held

    sent.append({"error": "CheckpointError", "user": True, "message": "no usable checkpoint in r"})
    with pytest.raises(CheckpointError, match="no usable checkpoint in r"):  # rank 0's error, the same type
        resume_point(tmp_path, 1, "latest")


# ----------------------------------------------------------------------------- torchrun on MPS


@pytest.mark.parametrize("device", ["auto", "mps"])
def test_torchrun_with_mps_is_a_config_error(device, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: True)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)

    def no_group(*_a, **_k):
        raise AssertionError("no process group may be created")

    monkeypatch.setattr(runtime.dist, "init_process_group", no_group)
    with pytest.raises(ConfigError, match="torchrun needs CUDA GPUs or --device cpu"):
        runtime.init_distributed(device)
    with pytest.raises(AssertionError, match="no process group"):  # --device cpu goes on to gloo
        runtime.init_distributed("cpu")


def test_a_failed_start_leaves_no_empty_folders_behind(tmp_path, tiny_images) -> None:
    """Missing data, or a prepared folder of another size: one error line, and no run or grids folder made."""
    from ddpmctl.prepare import prepare

    prepared = tmp_path / "p16"
    prepare(tiny_images, prepared, size=16)
    for data, needle in ((tmp_path / "nowhere", "does not exist"), (prepared, "was prepared at 16px")):
        work = tmp_path / "fresh"
        result = runner.invoke(app, ["train", *tiny_args(data, work, img_size=32, attention_resolutions="16")])
        assert_one_line_error(result, needle)
        assert not work.exists(), sorted(work.rglob("*"))
    existing = tmp_path / "kept"
    (existing / "working").mkdir(parents=True)
    result = runner.invoke(app, ["train", *tiny_args(tmp_path / "nowhere", existing)])
    assert_one_line_error(result, "does not exist")
    assert sorted(p.name for p in existing.iterdir()) == ["working"]  # what was there before stays


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_sampling_a_run_still_training_toward_its_first_save_says_so(tmp_path) -> None:
    run = tmp_path / "working" / "busy"
    run.mkdir(parents=True)
    result = runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s")])
    assert_one_line_error(result, "stopped before its first save")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / layout.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s")])
        assert_one_line_error(result, "still training toward its first save")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_start_refused_by_the_lock_tidies_nothing_of_the_run_that_holds_it(tmp_path, tiny_images, monkeypatch):
    """Two starts of one new run: the one that lost the lock must not remove the winner's folder or lock file,
    even though the folder did not exist when it looked (here: it is made between the look and the lock)."""
    run = tmp_path / "working" / "tiny"
    monkeypatch.setattr(engine, "missing_folders", lambda *paths: [run, run.parent])
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run / layout.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path)])
        assert_one_line_error(result, "is in use by another ddpmctl process")
        assert (run / layout.LOCK).read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_asking_whether_a_run_trains_writes_nothing(tmp_path) -> None:
    """sample/resume name a folder without checkpoints: the lock probe leaves a .lock file as it found it."""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / layout.LOCK).write_text("someone else's\n")
    result = runner.invoke(app, ["sample", "--checkpoint", str(folder), "--out", str(tmp_path / "s")])
    assert_one_line_error(result, "holds no checkpoint yet")
    assert (folder / layout.LOCK).read_text() == "someone else's\n"
    with runlock.RunLock(folder):  # this process's own lock: its run is not "still training" elsewhere
        assert runlock.is_training(folder) is False
        with pytest.raises(CheckpointError, match="stopped before its first save"):
            rundir.resolve_checkpoint(folder, "checkpoint_5")
