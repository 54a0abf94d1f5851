"""--resume_from_checkpoint against a finished tiny fixmatch run: a refused resume writes nothing; another
dataset is named before a config error; changed hyperparameters are refused (with the --init_from way
out) and the recorded config is what ran; a setting that may change is applied, warned and recorded; a
moved dataset resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests._helpers import copy_synthetic_dataset, one_error_line
from tests._helpers import tiny_fixmatch_argv as argv
from tests._helpers import train_captured as train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_cache):
    """A finished 4-step fixmatch run (checkpoints at 2 and 4, export)."""
    out = tmp_path_factory.mktemp("resume_checks") / "run"
    code, _, err = train(argv(out, synthetic_cache))
    assert code == 0, err[-3000:]
    return out


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_refused_resume_writes_nothing(finished_run, synthetic_cache):
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, synthetic_cache, "--synthetic_num_samples", "360", "--resume_from_checkpoint", "latest"))
    line = one_error_line(code, err)
    assert "cannot resume" in line or "cannot resume" in err
    assert snapshot(finished_run) == before


def test_resume_mismatch_is_reported_before_a_config_error(finished_run, synthetic_cache, tmp_path):
    # another (smaller) dataset whose labelled rows are fewer than the batch: the resume mismatch comes first
    from data_utils.synthetic import make_synthetic_dataset

    small = tmp_path / "small"
    make_synthetic_dataset("multimodal", small, num_samples=200, image_size=32, labeled_fraction=0.05)
    code, _, err = train(argv(tmp_path / "x", synthetic_cache, "--dataset", str(small), "--per_device_train_batch_size", "32"))
    assert code == 1 and "cannot resume" not in err  # on its own: the config error
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, synthetic_cache, "--dataset", str(small), "--per_device_train_batch_size", "32",
                              "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "cannot resume" in err and "other content" in err
    assert snapshot(finished_run) == before


def test_changed_hyperparameters_on_resume_are_refused_and_recorded_config_is_what_ran(finished_run, synthetic_cache):
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, synthetic_cache, "--learning_rate", "0.5", "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "learning_rate: 0.01 -> 0.5" in err and "--init_from" in err
    code, _, err = train(argv(finished_run, synthetic_cache, "--max_steps", "8", "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "max_steps: 4 -> 8" in err and f"--init_from {finished_run}" in err and "learning rate 0" in err
    assert snapshot(finished_run) == before
    assert yaml.safe_load((finished_run / "run_config.yaml").read_text())["learning_rate"] == 0.01


def test_applied_setting_on_resume_is_warned_and_recorded(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    assert train(argv(out, synthetic_cache, "--stop_after_steps", "2", "--export", "false"))[0] == 0
    code, stdout, err = train(argv(out, synthetic_cache, "--eval_steps", "1", "--export", "false", "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    assert "eval_steps: 2 -> 1" in stdout + err
    info = json.loads((out / "run_info.json").read_text())
    assert info["changed_on_resume"] == {"eval_steps": [2, 1], "stop_after_steps": [2, None]}
    assert yaml.safe_load((out / "run_config.yaml").read_text())["eval_steps"] == 1


def test_moved_dataset_resumes(tmp_path, synthetic_cache):
    data = copy_synthetic_dataset(synthetic_cache, tmp_path / "a" / "ds")
    out = tmp_path / "run"
    assert train(argv(out, synthetic_cache, "--dataset", str(data), "--stop_after_steps", "2", "--export", "false"))[0] == 0
    moved = tmp_path / "b" / "ds_moved"
    moved.parent.mkdir()
    shutil.move(str(data), str(moved))
    code, _, err = train(argv(out, synthetic_cache, "--dataset", str(moved), "--export", "false", "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
