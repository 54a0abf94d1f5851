"""FixMatch through the real CLI path: real synthetic data, real loaders and views, a real model.

A run of 2N steps and a run stopped at N then resumed for N more must end with bit-identical
exported weights: this covers the data position, the per-sample augmentation seeds, the EMA model
(the exported network) and the optimizer/scheduler state together. The SSL logs (mask ratio,
pseudo-label accuracy from the unlabelled ground truth) must reach the JSONL and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._helpers import run_train


def fixmatch_argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--method", "fixmatch", "--model", "multimodal-concat-tiny", "--threshold", "0.3",
        "--output_dir", str(out), "--dataset_cache_dir", str(cache), "--synthetic_num_samples", "300",
        "--labeled_fraction", "0.2", "--mu", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "64", "--max_steps", "8", "--eval_steps", "4", "--save_steps", "4",
        "--logging_steps", "2", "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "true",
        "--seed", "5", *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_cache):
    root = tmp_path_factory.mktemp("fixmatch_e2e")
    straight, resumed = root / "straight", root / "resumed"
    assert run_train(fixmatch_argv(straight, synthetic_cache)) == 0
    assert run_train(fixmatch_argv(resumed, synthetic_cache, "--stop_after_steps", "4")) == 0
    assert not (resumed / "model.safetensors").exists(), "a stopped run must not export yet"
    assert run_train(fixmatch_argv(resumed, synthetic_cache, "--resume_from_checkpoint", "latest")) == 0
    return straight, resumed


def test_resumed_fixmatch_run_ends_with_identical_weights(runs):
    straight, resumed = runs
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fixmatch_logs_pseudo_label_quality_and_plots_it(runs):
    straight, _ = runs
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "mask_ratio" in r]
    assert train_records, "fixmatch's mask ratio must be logged"
    assert any("pseudo_label_accuracy" in r for r in train_records)
    assert any(r.get("unsup_loss", 0.0) > 0.0 for r in train_records), "the unlabelled term never trained anything"
    assert (straight / "plots" / "pseudo_labels.png").is_file()


def test_fixmatch_export_reloads_with_auto_model(runs):
    from transformers import AutoModel

    import modeling_stil  # noqa: F401  (registers the Auto classes)

    straight, _ = runs
    model = AutoModel.from_pretrained(straight)
    saved = load_file(straight / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
