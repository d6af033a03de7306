"""Checkpoint files: atomic saves, damage detection and fallback, safe loading, prune plans, list, export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddpmctl import checkpoints as ck
from ddpmctl import layout, prune, rundir
from ddpmctl.cli import checkpoints as cli_checkpoints
from ddpmctl.cli.main import app
from ddpmctl.config import ModelConfig, saved_model_config
from ddpmctl.errors import CheckpointError
from ddpmctl.model import UNet

runner = CliRunner()

MODEL_CFG = {"img_size": 8, "starting_channels": 8, "channel_multipliers": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [4], "num_heads": 2, "bottleneck_blocks": 1, "dropout": 0.0}


def fake_checkpoint(run: Path, step: int, ema: bool = True, loss: float | None = 0.5) -> Path:
    """A small but well-formed checkpoint (a real tiny UNet's weights), written by save_checkpoint."""
    torch.manual_seed(step)
    net = UNet(ModelConfig(**MODEL_CFG))
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step}, "rng": None}
    meta = {"config": {"model": MODEL_CFG, "diffusion": {"num_diffusion_timesteps": 20}}, "loss": loss, "ema": ema}
    ema_state = {k: v * 0.5 for k, v in net.state_dict().items()} if ema else None
    return ck.save_checkpoint(run, step, net.state_dict(), state, meta, ema_state=ema_state)


def rewrite_meta(path: Path) -> None:
    """Record the current sizes and hashes in meta.json, as an attacker replacing a file would."""
    meta = json.loads((path / ck.META).read_text())
    for name in meta["files"]:
        meta["files"][name] = {"size": (path / name).stat().st_size, "sha256": ck.sha256_file(path / name)}
    (path / ck.META).write_text(json.dumps(meta))



def flip_byte(path: Path) -> None:
    """Silent damage (bit rot, a bad copy): one byte flipped, the size unchanged."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))



# ----------------------------------------------------------------------------- saving


def test_save_writes_complete_checkpoint_with_hashes_and_no_leftovers(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path, 7)
    assert path == tmp_path / "checkpoint_7"
    assert sorted(p.name for p in path.iterdir()) == sorted([ck.MODEL, ck.EMA, ck.STATE, ck.META])
    meta = json.loads((path / ck.META).read_text())
    assert meta["step"] == 7 and meta["format_version"] == ck.FORMAT_VERSION
    assert set(meta["files"]) == {ck.MODEL, ck.EMA, ck.STATE}
    for name, rec in meta["files"].items():
        assert rec["size"] == (path / name).stat().st_size and rec["sha256"] == ck.sha256_file(path / name)
    assert ck.inspect_checkpoint(path, verify_hashes=True).complete
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_7"]  # no temporary folder left


def test_failed_save_leaves_run_folder_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checkpoint(tmp_path, 1)

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        fake_checkpoint(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]
    assert ck.inspect_checkpoint(tmp_path / "checkpoint_1", verify_hashes=True).complete


def test_disk_full_inside_torch_save_or_safetensors_is_one_line_and_leaves_run_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    fake_checkpoint(tmp_path, 1)

    def torch_disk_full(*_a, **_k):  # what torch.save raises when the disk fills while it writes
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 76416 vs 76308")

    def safetensors_disk_full(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    for target, writer, fake, detail in ((ck.torch, "save", torch_disk_full, "unexpected pos 76416 vs 76308"),
                                         (ck, "save_file", safetensors_disk_full, "No space left on device")):
        with monkeypatch.context() as m:
            m.setattr(target, writer, fake)
            with pytest.raises(CheckpointError) as err:
                fake_checkpoint(tmp_path, 2)
        message = str(err.value)
        assert message.startswith(f"could not write {tmp_path / 'checkpoint_2'}: ") and "\n" not in message
        assert detail in message and "the disk may be full" in message and "free there" in message
        assert message.endswith("the previous checkpoints are untouched")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1"]  # no temporary folder left
        assert ck.inspect_checkpoint(tmp_path / "checkpoint_1", verify_hashes=True).complete


def test_resave_of_same_step_replaces_it_and_killed_replacement_is_restored(tmp_path: Path) -> None:
    first = fake_checkpoint(tmp_path, 3, loss=1.0)
    fake_checkpoint(tmp_path, 3, loss=2.0)
    assert ck.inspect_checkpoint(first).loss == 2.0
    # A process killed between "move the old copy aside" and "move the new one in" leaves only .old-...
    dead_pid = 2**22 + 12345  # above the usual pid_max: no live process has it
    first.rename(tmp_path / f".old-checkpoint_3-{dead_pid}")
    (tmp_path / f".tmp-checkpoint_4-{dead_pid}").mkdir()
    (tmp_path / f".trash-checkpoint_1-{dead_pid}").mkdir()
    rundir.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_3"]
    assert ck.inspect_checkpoint(tmp_path / "checkpoint_3", verify_hashes=True).complete


def test_rotate_keeps_newest_complete_and_ignores_damaged(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step, ema=False)
    (tmp_path / "checkpoint_5").mkdir()  # damaged newest: must not count as one of the kept
    removed = rundir.rotate(tmp_path, keep=2, protect=tmp_path / "checkpoint_4")
    assert sorted(p.name for p in removed) == ["checkpoint_1", "checkpoint_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_3", "checkpoint_4", "checkpoint_5"]



def test_rotation_during_training_does_not_hash_every_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, ema=False)

    def no_hashing(_path: Path) -> str:
        raise AssertionError("rotation runs at every save: it checks sizes, it must not re-read every checkpoint")

    monkeypatch.setattr(ck, "sha256_file", no_hashing)
    removed = rundir.rotate(tmp_path, keep=1, protect=tmp_path / "checkpoint_3")
    assert [p.name for p in removed] == ["checkpoint_1", "checkpoint_2"]

# ----------------------------------------------------------------------------- damage and fallback


def test_truncated_newest_is_detected_and_resolve_falls_back_with_a_note(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    newest = tmp_path / "checkpoint_30"
    with open(newest / ck.MODEL, "r+b") as fh:
        fh.truncate(100)
    info = ck.inspect_checkpoint(newest)
    assert not info.complete and "model.safetensors is truncated" in info.problem
    path, notes = rundir.resolve_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoint_20"
    assert len(notes) == 1 and "checkpoint_30 is damaged" in notes[0] and "using checkpoint_20" in notes[0]


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    state = tmp_path / "checkpoint_2" / ck.STATE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert ck.inspect_checkpoint(tmp_path / "checkpoint_2").complete  # sizes alone cannot see it
    path, notes = rundir.resolve_checkpoint(tmp_path, "latest")
    assert path.name == "checkpoint_1" and "does not match its checksum" in notes[0]
    with pytest.raises(CheckpointError, match="checkpoint_2 is damaged"):
        rundir.resolve_checkpoint(tmp_path, "checkpoint_2")  # named explicitly: no silent substitute


def test_no_usable_checkpoint_says_why_each_one_is_unusable_checksums_included(tmp_path: Path) -> None:
    for step in (1, 2):
        fake_checkpoint(tmp_path, step, ema=False)
    flip_byte(tmp_path / "checkpoint_1" / ck.MODEL)
    flip_byte(tmp_path / "checkpoint_2" / ck.STATE)
    with pytest.raises(CheckpointError) as err:
        rundir.resolve_checkpoint(tmp_path)
    assert str(err.value) == (f"no usable checkpoint in {tmp_path}; it holds: "
                              "checkpoint_1 (damaged: model.safetensors does not match its checksum), "
                              "checkpoint_2 (damaged: training_state.pt does not match its checksum)")
    with pytest.raises(CheckpointError) as err:  # a name that is not there: the others listed, by size (no reading)
        rundir.resolve_checkpoint(tmp_path, "checkpoint_3")
    assert str(err.value).endswith("it holds: checkpoint_1, checkpoint_2")


def test_folder_without_completion_marker_is_never_used(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 1)
    half = fake_checkpoint(tmp_path, 2)
    (half / ck.META).unlink()
    assert rundir.resolve_checkpoint(tmp_path)[0].name == "checkpoint_1"
    (tmp_path / "checkpoint_1" / ck.META).write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        rundir.resolve_checkpoint(tmp_path)
    message = str(err.value)
    assert "no usable checkpoint" in message and "checkpoint_1 (damaged: meta.json is unreadable)" in message
    assert "checkpoint_2 (incomplete: no meta.json" in message


def test_named_checkpoint_accepts_number(tmp_path: Path) -> None:
    for step in (5, 10):
        fake_checkpoint(tmp_path, step)
    assert rundir.resolve_checkpoint(tmp_path, "5") == (tmp_path / "checkpoint_5", [])  # moves nothing: sample uses it too
    with pytest.raises(CheckpointError, match="checkpoint_7 not found .* it holds: checkpoint_5, checkpoint_10"):
        rundir.resolve_checkpoint(tmp_path, "checkpoint_7")


def test_newer_checkpoints_are_set_aside_not_deleted_and_not_listed(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_20").mkdir()  # a damaged newer one stays: the resumed run replaces it at step 20
    notes = rundir.set_aside_newer(tmp_path, tmp_path / "checkpoint_5")
    aside = tmp_path / layout.ABANDONED
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_10", "checkpoint_15"]
    assert ck.inspect_checkpoint(aside / "checkpoint_15", verify_hashes=True).complete
    assert len(notes) == 1 and "checkpoint_10, checkpoint_15" in notes[0] and str(aside) in notes[0]
    assert [c.name for c in rundir.list_checkpoints(tmp_path)] == ["checkpoint_5", "checkpoint_20"]
    fake_checkpoint(tmp_path, 10)  # the new branch reaches step 10, then a resume from 5 again abandons it too
    rundir.set_aside_newer(tmp_path, tmp_path / "checkpoint_5")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_10", "checkpoint_10-2", "checkpoint_15"]
    assert rundir.set_aside_newer(tmp_path, tmp_path / "checkpoint_5") == []
    result = runner.invoke(app, ["checkpoints", "list", str(tmp_path)])
    assert result.exit_code == 0 and "checkpoint_15" not in result.output.replace(str(tmp_path), "")
    assert "resume uses checkpoint_5" in result.output and "abandoned" in result.output


# ----------------------------------------------------------------------------- safe loading


class Payload:
    """Unpickling this would write a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_pickle_payload_in_training_state_is_refused_and_never_runs(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path, 1)
    marker = tmp_path / "marker"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, path / ck.STATE)
    rewrite_meta(path)  # sizes and hashes match: only weights_only stands in the way
    assert ck.inspect_checkpoint(path, verify_hashes=True).complete
    with pytest.raises(CheckpointError) as err:
        ck.load_training_state(path)
    message = str(err.value)
    assert "refusing to load" in message and "pickled Python object" in message and "\n" not in message
    assert not marker.exists()


def test_garbage_files_are_one_line_errors(tmp_path: Path) -> None:
    path = fake_checkpoint(tmp_path, 1)
    (path / ck.STATE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot read .*training_state.pt"):
        ck.load_training_state(path)
    (path / ck.MODEL).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        ck.load_weights(path)
    torch.save([1, 2, 3], path / ck.STATE)  # loads, but is not a training state
    with pytest.raises(CheckpointError, match="not a ddpmctl training state"):
        ck.load_training_state(path)


def test_garbage_training_state_is_called_invalid_not_a_pickled_object(tmp_path: Path) -> None:
    import random

    path = fake_checkpoint(tmp_path, 1, ema=False)
    for seed in (0, 2):  # seed 0: the unpickler stops at an unknown opcode; seed 2: it trips over its own stack
        (path / ck.STATE).write_bytes(random.Random(seed).randbytes(4000))
        rewrite_meta(path)  # the checksum matches: the bytes themselves are the problem
        assert ck.inspect_checkpoint(path, verify_hashes=True).complete
        with pytest.raises(CheckpointError) as err:
            ck.load_training_state(path)
        message = str(err.value)
        assert message.startswith(f"cannot read {path / ck.STATE}: it is not a valid training state (")
        assert message.endswith("; the file is damaged or was not written by ddpmctl") and "\n" not in message
        assert "pickled" not in message and "run code" not in message
    (path / ck.STATE).unlink()
    with pytest.raises(CheckpointError, match=r"cannot read .*training_state.pt: No such file or directory$"):
        ck.load_training_state(path)


def test_truncate_metrics_drops_replayed_and_torn_rows(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    metrics.write_text("\n".join(rows) + '\n{"step": 5, "lo')
    assert rundir.truncate_metrics(metrics, 2) == 3
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert rundir.truncate_metrics(metrics, 2) == 0


# ----------------------------------------------------------------------------- prune


def test_prune_plan_keep_rules(tmp_path: Path) -> None:
    for step in (100, 200, 300, 400, 500, 600):
        fake_checkpoint(tmp_path, step, ema=False)
    (tmp_path / "checkpoint_250").mkdir()  # damaged, older than the newest: removed
    plan = prune.plan_prune(tmp_path, keep=2, keep_every=200)
    kept = {info.name: why for info, why in plan.keep}
    gone = {info.name: why for info, why in plan.remove}
    assert kept == {"checkpoint_200": "milestone (every 200)", "checkpoint_400": "milestone (every 200)",
                    "checkpoint_500": "among the newest 2", "checkpoint_600": "newest"}
    assert set(gone) == {"checkpoint_100", "checkpoint_250", "checkpoint_300"}
    assert gone["checkpoint_250"].startswith("incomplete")
    assert plan.freed_bytes > 0
    assert prune.plan_prune(tmp_path, keep=10).remove == [(info, why) for info, why in plan.remove
                                                          if info.name == "checkpoint_250"]
    with pytest.raises(CheckpointError, match="at least 1"):
        prune.plan_prune(tmp_path, keep=0)


def test_prune_never_deletes_the_newest(tmp_path: Path) -> None:
    for step in (1, 2):
        fake_checkpoint(tmp_path, step, ema=False)
    (tmp_path / "checkpoint_3").mkdir()  # the newest folder is damaged: left alone, and checkpoint_2 kept
    plan = prune.plan_prune(tmp_path, keep=1)
    assert [i.name for i, _ in plan.keep] == ["checkpoint_2", "checkpoint_3"]
    assert [i.name for i, _ in plan.remove] == ["checkpoint_1"]
    # Even a stale plan that names the newest complete checkpoint spares it.
    plan.remove.append((ck.inspect_checkpoint(tmp_path / "checkpoint_2"), "forced"))
    assert [p.name for p in prune.execute_prune(plan)] == ["checkpoint_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2", "checkpoint_3"]


def test_prune_and_list_check_checksums_so_a_bitrotten_newest_is_not_all_that_survives(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, ema=False)
    flip_byte(tmp_path / "checkpoint_3" / ck.MODEL)  # same size: only the checksum can tell
    assert ck.inspect_checkpoint(tmp_path / "checkpoint_3").complete

    plan = prune.plan_prune(tmp_path, keep=1)
    assert [(i.name, why) for i, why in plan.keep] == [
        ("checkpoint_2", "newest complete"),
        ("checkpoint_3", "newest folder, damaged: model.safetensors does not match its checksum")]
    assert [i.name for i, _ in plan.remove] == ["checkpoint_1"]

    listing = runner.invoke(app, ["checkpoints", "list", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line for line in listing.output.splitlines() if line.startswith("checkpoint_")}
    assert rows["checkpoint_2"].rstrip().endswith(" ok") and "damaged:" in rows["checkpoint_3"]
    assert "checksum" in listing.output  # the status column wraps in CliRunner's 80 columns
    assert "resume uses checkpoint_2" in listing.output  # what resume really picks:
    assert rundir.resolve_checkpoint(tmp_path)[0].name == "checkpoint_2"

    # A stale plan that would delete every good checkpoint still spares the newest good one.
    stale = prune.PrunePlan(tmp_path, keep=[(ck.inspect_checkpoint(tmp_path / "checkpoint_3"), "newest")],
                            remove=[(ck.inspect_checkpoint(tmp_path / f"checkpoint_{s}"), "stale") for s in (1, 2)])
    assert [p.name for p in prune.execute_prune(stale)] == ["checkpoint_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2", "checkpoint_3"]
    assert rundir.resolve_checkpoint(tmp_path)[0].name == "checkpoint_2"  # the run can still be resumed


def test_prune_treats_a_checksum_failure_among_the_kept_as_damage(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step, ema=False)
    flip_byte(tmp_path / "checkpoint_30" / ck.STATE)
    flip_byte(tmp_path / "checkpoint_20" / ck.MODEL)  # a milestone: kept only if it is good
    plan = prune.plan_prune(tmp_path, keep=2, keep_every=20)
    assert {i.name: why for i, why in plan.keep} == {"checkpoint_40": "newest", "checkpoint_10": "among the newest 2"}
    assert {i.name: why for i, why in plan.remove} == {
        "checkpoint_20": "damaged: model.safetensors does not match its checksum",
        "checkpoint_30": "damaged: training_state.pt does not match its checksum"}
    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "2", "--keep-every", "20", "--yes"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10", "checkpoint_40"]


def test_prune_of_a_symlinked_checkpoint_removes_the_link_never_its_target(tmp_path: Path) -> None:
    other = tmp_path / "other"
    fake_checkpoint(other, 5, ema=False)
    run = tmp_path / "run"
    for step in (10, 20):
        fake_checkpoint(run, step, ema=False)
    (run / "checkpoint_1").symlink_to(other / "checkpoint_5", target_is_directory=True)
    from ddpmctl.cli.checkpoints import human_size

    freed = sum(f.stat().st_size for f in (run / "checkpoint_10").iterdir())  # the link frees nothing
    result = runner.invoke(app, ["checkpoints", "prune", str(run), "--keep", "1", "--yes"])
    assert result.exit_code == 0, result.output
    assert f"{human_size(freed)} freed" in result.output
    assert "deleted 2 checkpoint(s): checkpoint_1, checkpoint_10" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_20"]  # no .trash-checkpoint_1-<pid> left behind
    assert ck.inspect_checkpoint(other / "checkpoint_5", verify_hashes=True).complete
    # A link an older prune left as trash is tidied the same way.
    (run / f".trash-checkpoint_1-{2**22 + 12345}").symlink_to(other / "checkpoint_5", target_is_directory=True)
    rundir.clean_stale_temporaries(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_20"]
    assert ck.inspect_checkpoint(other / "checkpoint_5", verify_hashes=True).complete


def test_prune_cli_dry_run_confirmation_and_yes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_checkpoints, "_stdin_is_terminal", lambda: True)  # answers come from CliRunner's input
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, ema=False)
    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "checkpoint_1" in result.output and "delete" in result.output and "dry run: nothing deleted" in result.output
    assert names() == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]

    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "1"], input="n\n")
    assert result.exit_code == 1 and "nothing deleted" in result.output
    assert names() == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]

    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "2"], input="y\n")
    assert result.exit_code == 0, result.output
    assert "deleted 1 checkpoint(s): checkpoint_1" in result.output
    assert names() == ["checkpoint_2", "checkpoint_3"]

    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "1", "--yes"])
    assert result.exit_code == 0 and names() == ["checkpoint_3"]

    assert_one_line_error(runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "0", "--yes"]),
                          "--keep must be at least 1")


def test_prune_without_a_terminal_and_without_yes_deletes_nothing_and_says_so(tmp_path: Path) -> None:
    for step in (1, 2):
        fake_checkpoint(tmp_path, step, ema=False)
    result = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "1"])  # stdin: not a terminal
    assert_one_line_error(result, "nothing deleted: stdin is not a terminal", "pass --yes to delete without asking")
    assert "Aborted" not in result.output and "Delete them?" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    dry = runner.invoke(app, ["checkpoints", "prune", str(tmp_path), "--keep", "1", "--dry-run"])
    assert dry.exit_code == 0 and "dry run: nothing deleted" in dry.output

# ----------------------------------------------------------------------------- list and export


def test_list_cli_shows_table_and_damage(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 5, ema=True, loss=0.1234)
    fake_checkpoint(tmp_path, 10, ema=False, loss=None)
    (tmp_path / "checkpoint_15").mkdir()
    result = runner.invoke(app, ["checkpoints", "list", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row5 = next(line for line in lines if line.startswith("checkpoint_5 "))
    row10 = next(line for line in lines if line.startswith("checkpoint_10 "))
    row15 = next(line for line in lines if line.startswith("checkpoint_15 "))
    assert "yes" in row5 and "0.1234" in row5 and "KB" in row5 and "ok" in row5
    assert " no " in row10 and "ok" in row10
    assert "incomplete" in row15
    assert "3 checkpoint(s)" in result.output and "resume uses checkpoint_10" in result.output
    assert_one_line_error(runner.invoke(app, ["checkpoints", "list", str(tmp_path / "nope")]), "does not exist")
    assert_one_line_error(runner.invoke(app, ["checkpoints", "list", str(tmp_path / "checkpoint_5")]),
                          "is a checkpoint folder; pass its run folder")


def test_sample_and_list_name_the_folder_to_pass_instead(tmp_path: Path) -> None:
    work = tmp_path / "working"
    run = work / "tiny"
    fake_checkpoint(run, 5, ema=False)
    (run / "config.yaml").write_text("run: {}\n")  # what makes a folder a run
    (work / "other").mkdir()
    (work / "other" / "config.yaml").write_text("run: {}\n")
    (run / "metrics.jsonl").write_text("")
    sample = lambda what: runner.invoke(app, ["sample", "--checkpoint", str(what), "--out",  # noqa: E731
                                              str(tmp_path / "out"), "--device", "cpu"])

    assert_one_line_error(sample(run / "metrics.jsonl"),
                          f"{run / 'metrics.jsonl'} is a file, not a checkpoint folder or a run folder: "
                          f"pass the run folder {run}")
    assert_one_line_error(sample(run / "checkpoint_5" / ck.MODEL), f"pass the checkpoint folder {run / 'checkpoint_5'}")
    assert_one_line_error(sample(run / "checkpoint_2000"), f"checkpoint_2000 not found in {run}; it holds: checkpoint_5")
    assert_one_line_error(sample(work / "tinyy"), f"{work / 'tinyy'} does not exist; {work} is a working directory "
                          f"holding the runs other, tiny (pass one of them, e.g. {work / 'other'})")
    assert_one_line_error(sample(work), f"no usable checkpoint in {work}; it is a working directory holding the runs "
                          "other, tiny")
    for command in (["list"], ["prune", "--keep", "1", "--yes"]):
        assert_one_line_error(runner.invoke(app, ["checkpoints", *command, str(work)]),
                              f"{work} holds no checkpoint: it is a working directory holding the runs other, tiny "
                              f"(pass one of them, e.g. {work / 'other'})")
    assert_one_line_error(runner.invoke(app, ["checkpoints", "list", str(run / "metrics.jsonl")]),
                          "is a file, not a run folder")
    result = runner.invoke(app, ["checkpoints", "list", str(work / "other")])  # a run with no checkpoint yet
    assert result.exit_code == 0 and f"{work / 'other'} holds no checkpoint" in " ".join(result.output.split())


def test_export_writes_ema_weights_loadable_with_plain_safetensors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fake_checkpoint(run, 3)
    out = tmp_path / "export" / "model.safetensors"
    result = runner.invoke(app, ["checkpoints", "export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ema weights of checkpoint_3" in " ".join(result.output.split())
    # Plain safetensors + the UNet class: no ddpmctl checkpoint code involved.
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["weights"] == "ema" and meta["step"] == "3"
    model = UNet(saved_model_config(json.loads(meta["model_config"])))  # the README's recipe
    model.load_state_dict(load_file(str(out)))
    expected = load_file(str(run / "checkpoint_3" / ck.EMA))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    assert_one_line_error(runner.invoke(app, ["checkpoints", "export", str(run), "--out", str(out)]),
                          "already exists", "--force")
    fake_checkpoint(run, 4, ema=False)
    result = runner.invoke(app, ["checkpoints", "export", str(run / "checkpoint_4"), "--out", str(out), "--force"])
    assert result.exit_code == 0 and "no EMA weights" in result.output
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata()["weights"] == "model"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert_one_line_error(runner.invoke(app, ["checkpoints", "export", str(tmp_path / "x"), "--out", str(out)]),
                          "does not exist")


def test_scratch_folders_of_live_processes_are_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / f".tmp-checkpoint_9-{os.getppid()}"  # the parent process is alive
    mine.mkdir()
    rundir.clean_stale_temporaries(tmp_path)
    assert mine.is_dir()
    shutil.rmtree(mine)


# ----------------------------------------------------------------------------- options added after runs were saved


def test_runs_saved_before_time_embedding_silu_keep_the_network_they_trained(tiny_images: Path, tmp_path: Path) -> None:
    """A run whose config.yaml and meta.json predate an option resumes, samples and exports as it trained."""
    import yaml
    from conftest import tiny_args

    from ddpmctl.config import resolve_for_resume
    from ddpmctl.inference import load_model

    assert runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=2)]).exit_code == 0
    run = tmp_path / "working" / "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["time_embedding_silu"] is True
    # Make the run look as if saved before the option existed (meta.json's own bytes are not hashed).
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["time_embedding_silu"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    meta = json.loads((run / "checkpoint_2" / ck.META).read_text())
    del meta["config"]["model"]["time_embedding_silu"]
    (run / "checkpoint_2" / ck.META).write_text(json.dumps(meta))

    out = tmp_path / "old.safetensors"
    assert runner.invoke(app, ["checkpoints", "export", str(run / "checkpoint_2"), "--out", str(out)]).exit_code == 0
    with safe_open(str(out), "pt") as fh:
        assert json.loads(fh.metadata()["model_config"])["time_embedding_silu"] is False

    loaded = load_model(run, device="cpu")
    assert loaded.config.model.time_embedding_silu is False
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 17])
    with torch.no_grad():
        now = UNet(ModelConfig(**{**vars(loaded.config.model), "time_embedding_silu": True}))
        now.load_state_dict(loaded.model.state_dict())
        assert not torch.allclose(loaded.model(x, t), now.eval()(x, t))  # the flag changes the network

    cfg = resolve_for_resume(None, {"experiment_name": "tiny", "working_directory": str(tmp_path / "working")})
    assert cfg.model.time_embedding_silu is False
    # Asking for the other network on resuming is refused with the reason, not silently granted.
    assert_one_line_error(runner.invoke(app, ["train", *tiny_args(tiny_images, tmp_path, steps=3),
                                              "--resume-from-checkpoint", "latest", "--time-embedding-silu"]),
                          "time_embedding_silu (checkpoint False, now True)")
    result = runner.invoke(app, ["resume", "--experiment-name", "tiny", "--working-directory", str(tmp_path / "working"),
                                 "--num-training-steps", "3", "--path-to-data", str(tiny_images)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "checkpoint_3" / ck.META).read_text())["config"]["model"]["time_embedding_silu"] is False
