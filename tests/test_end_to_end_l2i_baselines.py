"""The L2I baselines through the real train.py path, one tiny run per task:

* landmarks: Mean Teacher on the synthetic faces with TCDCNN and standardised targets;
* classification: MixMatch on the synthetic CIFAR-like images (random mixup coefficients and
  permutations: resuming must restore the RNG too).

A run of 2N steps and a run stopped at N then resumed for N more end with bit-identical exported
weights (model, teacher/evaluation EMA, optimizer, data position, RNG); the export reloads with the
same test metrics; the prediction pictures are written next to the other plots."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests._helpers import flags, run_train

COMMON = {"per_device_eval_batch_size": "64", "max_steps": "4", "eval_steps": "2", "save_steps": "2",
          "logging_steps": "2", "report_to": "none", "disable_tqdm": "true", "seed": "4", "mu": "1",
          "per_device_train_batch_size": "4"}
TASKS = {
    "landmarks": {"method": "mean_teacher", "model": "tcdcnn", "synthetic_task": "landmarks",
                  "synthetic_image_size": "60", "synthetic_num_samples": "120", "labeled_fraction": "0.2",
                  "standardize_targets": "true", "view_preset": "aflw", "optimizer": "sgd", "learning_rate": "0.01",
                  "eval_ema_warmup": "true", "unlabeled_includes_labeled": "true"},
    "classification": {"method": "mixmatch", "model": "image-tiny", "synthetic_task": "image",
                       "synthetic_num_samples": "150", "labeled_fraction": "0.2", "view_preset": "cifar",
                       "optimizer": "adam", "learning_rate": "0.002", "weight_decay": "0", "eval_ema_warmup": "true"},
}


@pytest.fixture(scope="module", params=sorted(TASKS))
def runs(request, tmp_path_factory, synthetic_cache):
    root = tmp_path_factory.mktemp(f"l2i_e2e_{request.param}")
    values = {**COMMON, **TASKS[request.param], "dataset_cache_dir": str(synthetic_cache)}
    straight, resumed = root / "straight", root / "resumed"
    assert run_train(flags({**values, "output_dir": str(straight)})) == 0
    assert run_train(flags({**values, "output_dir": str(resumed), "stop_after_steps": "2"})) == 0
    assert not (resumed / "model.safetensors").exists()
    assert run_train(flags({**values, "output_dir": str(resumed), "resume_from_checkpoint": "latest"})) == 0
    return request.param, straight, resumed


def test_resumed_run_ends_with_identical_weights_and_method_state(runs):
    _, straight, resumed = runs
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the whole method state (student, teacher / evaluation EMA) of the last checkpoint
    a = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert any("ema" in key for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_reloads_with_the_same_metrics_and_pictures_are_written(runs):
    task, straight, _ = runs
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    picture = {"landmarks": "landmarks.png", "classification": "confusion_matrix.png"}[task]
    assert (straight / "plots" / picture).is_file()
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert any(r.get("unsup_loss", 0.0) > 0.0 for r in train), "the unlabelled term never trained anything"
    if task == "landmarks":
        assert 0 < results["test"]["nme"] < 10 and "failure_rate" in results["test"]  # pixels, not z-scores
        assert any("pseudo_label_mse" in r for r in train)
    else:
        assert "accuracy" in results["test"]
