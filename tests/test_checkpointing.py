"""Checkpoint folders: atomic writes, 'latest', rotation (last K + best), fingerprints."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modeling_stil.training import checkpointing as ckpt
from tests._helpers import fresh_accelerate_state


@pytest.fixture
def accelerator(tmp_path):
    from accelerate import Accelerator

    with fresh_accelerate_state():
        yield Accelerator(cpu=True)


def _prepared(acc):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    progress = ckpt.TrainerProgress(fingerprint={"method": "m"})
    acc.register_for_checkpointing(progress)
    return model, opt, progress


def test_save_is_atomic_and_restores(tmp_path, accelerator):
    model, opt, progress = _prepared(accelerator)
    progress.step, progress.micro_step = 3, 6
    path = ckpt.save_checkpoint(accelerator, tmp_path, progress, extra={"note": 1})
    assert path.name == "checkpoint-3" and (path / "model.safetensors").is_file()
    state = json.loads((path / ckpt.STATE_FILENAME).read_text())
    assert state["step"] == 3 and state["micro_step"] == 6 and state["note"] == 1
    assert not list((tmp_path / "checkpoints").glob(".*"))

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    progress.step = 99
    accelerator.load_state(str(path))
    assert progress.step == 3 and progress.micro_step == 6
    assert torch.equal(model.state_dict()["weight"], saved["weight"])


def test_crash_during_save_leaves_no_checkpoint(tmp_path, accelerator, monkeypatch):
    model, opt, progress = _prepared(accelerator)
    progress.step = 1
    ckpt.save_checkpoint(accelerator, tmp_path, progress)
    progress.step = 2
    real = accelerator.save_state

    def crashing(output_dir=None, **kwargs):
        real(output_dir, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", crashing)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(accelerator, tmp_path, progress)
    # the half-written folder is removed: 'latest' is still step 1
    assert not (tmp_path / "checkpoints" / ".checkpoint-2.partial").exists()
    assert ckpt.resolve_checkpoint("latest", tmp_path).name == "checkpoint-1"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]


@pytest.mark.parametrize("failure", ["torch_zip_writer", "os_error"])
def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, accelerator, monkeypatch, failure):
    """A disk that fills up while optimizer.bin is written: torch's zip writer says only "unexpected pos"
    (the disk is then nearly full), a plain write raises ENOSPC. One line names the reason, the file and
    the folder; the partial checkpoint is removed; the previous checkpoint still loads."""
    model, opt, progress = _prepared(accelerator)
    progress.step = 5
    ckpt.save_checkpoint(accelerator, tmp_path, progress)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    progress.step = 10
    real = accelerator.save_state

    def filling_the_disk(output_dir=None, **kwargs):
        real(output_dir, **kwargs)
        short = Path(output_dir) / "optimizer.bin"  # the file being written when the disk filled up
        short.write_bytes(short.read_bytes()[:64])
        later = time.time_ns() + 10**9
        os.utime(short, ns=(later, later))
        if failure == "torch_zip_writer":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 811584 vs 811488")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", filling_the_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: SimpleNamespace(total=4 * 2**20, used=4 * 2**20 - 512, free=512))
    with pytest.raises(ckpt.CheckpointWriteError) as error:
        ckpt.save_checkpoint(accelerator, tmp_path, progress)
    message = str(error.value)
    assert "\n" not in message and error.value.__suppress_context__  # one line, no chained traceback
    assert message.startswith("no space left on device while writing checkpoint-10/optimizer.bin in "
                              f"{tmp_path / 'checkpoints'}:")
    assert "partial checkpoint was removed" in message and "checkpoint-5, is intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-5"]
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.load_checkpoint(accelerator, ckpt.resolve_checkpoint("latest", tmp_path), progress)
    assert progress.step == 5 and torch.equal(model.state_dict()["weight"], saved["weight"])


def test_a_failed_checkpoint_write_ends_train_py_with_one_line(monkeypatch, capsys):
    from modeling_stil.training import job
    from tests._helpers import run_train

    def full_disk(args):
        raise ckpt.CheckpointWriteError("no space left on device while writing checkpoint-5/optimizer.bin in runs/x/checkpoints: ...")

    monkeypatch.setattr(job, "build_and_train", full_disk)
    assert run_train(["--max_steps", "1", "--report_to", "none"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: no space left on device while writing checkpoint-5/optimizer.bin in runs/x/checkpoints: ..."]

    def full_disk_in_the_log(args):  # any other file of the run
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/logs/metrics.jsonl")

    monkeypatch.setattr(job, "build_and_train", full_disk_in_the_log)
    assert run_train(["--max_steps", "1", "--report_to", "none", "--output_dir", "runs/x"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "train.py: error: no space left on device while writing runs/x/logs/metrics.jsonl (--output_dir runs/x); "
        "free space there or choose an --output_dir on a larger disk"]


def _fake_checkpoints(tmp_path, steps):
    for step in steps:
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / ckpt.STATE_FILENAME).write_text(json.dumps({"step": step, "fingerprint": {"method": "a"}}))


def test_latest_is_numeric_not_lexicographic(tmp_path):
    _fake_checkpoints(tmp_path, [9, 10, 100, 20])
    assert ckpt.resolve_checkpoint("latest", tmp_path).name == "checkpoint-100"
    assert ckpt.resolve_checkpoint(str(tmp_path), tmp_path / "elsewhere").name == "checkpoint-100"
    assert ckpt.resolve_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-20"), tmp_path).name == "checkpoint-20"


def test_latest_without_checkpoints_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a stil checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path), tmp_path)


def test_rotation_protects_best(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    deleted = ckpt.rotate_checkpoints(tmp_path, keep_last=2, protect={"checkpoint-2"})
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-3"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert ckpt.rotate_checkpoints(tmp_path, keep_last=None) == []


def test_fingerprint_differences_name_the_reason(tmp_path):
    a = ckpt.make_fingerprint("fixmatch", {"model_type": "m", "hidden": 8, "transformers_version": "5"}, {"rows": 10, "labeled": "x"})
    same = ckpt.make_fingerprint("fixmatch", {"model_type": "m", "hidden": 8, "transformers_version": "6"}, {"rows": 10, "labeled": "x"})
    assert ckpt.fingerprint_differences(a, same) == []  # volatile keys do not matter
    b = ckpt.make_fingerprint("supervised", {"model_type": "m", "hidden": 16}, {"rows": 10, "labeled": "y"})
    diffs = ckpt.fingerprint_differences(a, b)
    assert len(diffs) == 3 and "labeled: 'x' vs 'y'" in diffs[2]
    _fake_checkpoints(tmp_path, [1])
    folder = tmp_path / "checkpoints" / "checkpoint-1"
    (folder / ckpt.STATE_FILENAME).write_text(json.dumps({"step": 1, "fingerprint": a}))
    assert ckpt.check_compatible(folder, same)["step"] == 1
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="supervised"):
        ckpt.check_compatible(folder, b)
