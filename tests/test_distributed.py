"""`accelerate launch --num_processes 2 --cpu train.py` (gloo) == one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._helpers import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]


def _argv(out: Path, cache: Path, batch: int) -> list[str]:
    # tabular-tiny: LayerNorm only (BatchNorm statistics would legitimately differ per rank), no dropout
    return [
        str(ROOT / "train.py"), "--output_dir", str(out), "--dataset_cache_dir", str(cache),
        "--synthetic_num_samples", "400", "--labeled_fraction", "0.5", "--model", "tabular-tiny",
        "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "3", "--per_device_train_batch_size", str(batch),
        "--per_device_eval_batch_size", "50", "--report_to", "none", "--disable_tqdm", "true", "--seed", "5",
        "--optimizer", "sgd", "--learning_rate", "0.1", "--warmup", "0",
    ]


def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    single = accelerate_launch(_argv(tmp_path / "one", cache, 16), 1, tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = accelerate_launch(_argv(tmp_path / "two", cache, 8), 2, tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]

    info = json.loads((tmp_path / "two" / "run_info.json").read_text())
    assert info["num_processes"] == 2
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    r1 = json.loads((tmp_path / "one" / "eval_results.json").read_text())["test"]
    r2 = json.loads((tmp_path / "two" / "eval_results.json").read_text())["test"]
    assert r1["num_samples"] == r2["num_samples"]  # gather_for_metrics dropped the padding duplicates
    assert r1["accuracy"] == pytest.approx(r2["accuracy"], abs=1e-6)
    # and both runs really trained (the comparison is not between two untouched initialisations)
    for run in ("one", "two"):
        history = [json.loads(l) for l in (tmp_path / run / "logs" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in history if r["split"] == "train"]
        assert train and all(r["grad_norm"] > 0 for r in train)


def _toy_bank_argv(out: Path, cache: Path, batch: int) -> list[str]:
    # multimodal-concat-tiny: a timm test_resnet image encoder with BatchNorm, so each rank's running statistics differ until averaged
    return [
        str(ROOT / "train.py"), "--method", "tests.toy_methods:BankMethod", "--output_dir", str(out),
        "--dataset_cache_dir", str(cache), "--synthetic_num_samples", "400", "--labeled_fraction", "0.5",
        "--model", "multimodal-concat-tiny", "--mu", "2", "--max_steps", "4", "--eval_steps", "2",
        "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "50", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "5",
    ]


def test_two_processes_with_batchnorm_report_the_exported_model_and_keep_method_state(tmp_path):
    """The issue's failing path: BN statistics differed per rank, so the reported metrics mixed two models.
    Now they are averaged before evaluation and checkpoints: the run's test metrics equal the reloaded
    export's (export_run checks it), and the method's own state (a bank written through state.gather,
    per-class sums through state.reduce_sum) equals the one-process run on the same global batch."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    single = accelerate_launch(_toy_bank_argv(tmp_path / "one", cache, 8), 1, tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    double = accelerate_launch(_toy_bank_argv(tmp_path / "two", cache, 4), 2, tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    assert results["reload_check"]["metrics"]["accuracy"] == results["test"]["accuracy"]

    a = load_file(tmp_path / "one" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert torch.count_nonzero(a["bank"]) > 0
    torch.testing.assert_close(a["bank"], b["bank"])
    torch.testing.assert_close(a["class_sums"], b["class_sums"])
    # the BN running statistics in the checkpoint are one model's: every rank saved/evaluated the average
    bn = [k for k in b if k.endswith("running_mean")]
    assert bn, "the test needs a BatchNorm model"


@pytest.mark.parametrize("method, extra", [("stil", ["--mu", "2", "--start_epoch", "-1", "--th1", "0.0"]), ("tip_pretrain", [])])
def test_stil_and_tip_train_on_two_processes(tmp_path, method, extra):
    """accelerate launch --num_processes 2 --cpu: STiL (prototype sums reduced across processes,
    teacher, three heads) and TIP (label-free stream) finish, and the reported test metrics are the
    reloaded export's."""
    argv = [str(ROOT / "train.py"), "--method", method, "--output_dir", str(tmp_path / "run"),
            "--dataset_cache_dir", str(tmp_path / "cache"), "--synthetic_num_samples", "300", "--labeled_fraction", "0.2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "32", "--max_steps", "3",
            "--eval_steps", "3", "--report_to", "none", "--disable_tqdm", "true", *extra]
    done = accelerate_launch(argv, 2, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["num_processes"] == 2
