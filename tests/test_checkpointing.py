"""Checkpoint folders: atomic writes, 'latest', rotation (last K + best), fingerprints."""

from __future__ import annotations

import json

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
    # the half-written folder is invisible: 'latest' is still step 1
    assert (tmp_path / "checkpoints" / ".checkpoint-2.partial").exists()
    assert ckpt.resolve_checkpoint("latest", tmp_path).name == "checkpoint-1"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-1"]


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
