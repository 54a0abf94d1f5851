"""STiL through train.py: exact resume across an epoch end (prototypes), every loss term active and
logged, per-head validation metrics, export + reload, and one-line errors for data or models that
cannot run STiL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._helpers import flags, run_train


def stil_argv(out: Path, cache: Path, *extra: str) -> list[str]:
    """A tiny STiL run; ``extra`` flags replace the defaults of the same name."""
    base = [
        "--method", "stil", "--model", "stil-tiny", "--output_dir", str(out), "--dataset_cache_dir", str(cache),
        "--synthetic_num_samples", "300", "--labeled_fraction", "0.2", "--mu", "4", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "64", "--max_steps", "10", "--eval_steps", "5", "--logging_steps", "1",
        "--learning_rate", "0.001", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7",
        # unlabelled terms from the first epoch on, and a threshold every row passes, so each term trains
        "--start_epoch", "-1", "--th1", "0.0",
    ]
    return flags(dict(zip(base[::2], base[1::2])), *extra)


def _errors(capsys) -> list[str]:
    """train.py's error lines (progress bars of a dataset build may precede them); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("train.py")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_cache):
    root = tmp_path_factory.mktemp("stil_e2e")
    cache = synthetic_cache
    straight, resumed = root / "straight", root / "resumed"
    assert run_train(stil_argv(straight, cache)) == 0
    assert run_train(stil_argv(resumed, cache, "--stop_after_steps", "5")) == 0
    assert run_train(stil_argv(resumed, cache, "--resume_from_checkpoint", "latest")) == 0
    return straight, resumed, cache


def test_resumed_stil_run_ends_with_identical_weights_and_method_state(runs):
    straight, resumed, _ = runs
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa = load_file(straight / "checkpoints" / "checkpoint-10" / "model.safetensors")
    sb = load_file(resumed / "checkpoints" / "checkpoint-10" / "model.safetensors")
    for key in ("prototypes", "prototypes_sum", "prototypes_count_sum", "ema_step"):
        assert torch.equal(sa[key], sb[key]), key
    assert torch.count_nonzero(sa["prototypes"]) > 0, "prototypes were never computed at an epoch end"
    teacher = [k for k in sa if k.startswith("ema.module.")]
    assert teacher and all(torch.equal(sa[k], sb[k]) for k in teacher)


def test_every_stil_term_is_logged_and_active(runs):
    straight, _, _ = runs
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    for key in ("sup_loss_multimodal", "sup_loss_image", "sup_loss_tabular", "loss_cc", "club_bound_image",
                "club_estimator_image", "club_bound_tabular", "club_estimator_tabular", "loss_pt", "unsup_loss",
                "mask_ratio", "cgpl_case1", "cgpl_case2_image", "cgpl_case2_tabular", "cgpl_case3",
                "pseudo_label_accuracy"):
        assert key in train[-1], key
    assert any(r["unsup_loss"] > 0 for r in train) and any(r["loss_pt"] > 0 for r in train)
    for r in train:
        assert r["cgpl_case1"] + r["cgpl_case2_image"] + r["cgpl_case2_tabular"] + r["cgpl_case3"] == pytest.approx(1.0, abs=1e-5)
    validation = [r for r in records if r["split"] == "validation"]
    assert {"accuracy", "image/accuracy", "tabular/accuracy"} <= set(validation[-1])
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    assert (straight / "plots" / "losses.png").is_file()


def test_stil_refuses_unimodal_data_and_models(runs, tmp_path, capsys):
    _, _, cache = runs
    code = run_train(stil_argv(tmp_path / "img", cache, "--synthetic_task", "image", "--model", "image-tiny"))
    assert code == 1
    err = _errors(capsys)
    assert len(err) == 1 and "stil" in err[0] and "image" in err[0]
    code = run_train(stil_argv(tmp_path / "mm", cache, "--model", "multimodal-concat-tiny"))
    assert code == 1
    err = _errors(capsys)
    assert len(err) == 1 and "StilModel" in err[0]


def test_init_from_another_schema_is_one_line(runs, tmp_path, capsys):
    straight, _, cache = runs
    code = run_train(stil_argv(tmp_path / "other", tmp_path / "cache2", "--synthetic_num_samples", "200",
                               "--init_from", str(tmp_path / "nowhere")))
    assert code == 1
    err = _errors(capsys)
    assert len(err) == 1 and "no such folder" in err[0]
