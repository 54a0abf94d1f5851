"""Shared by the MMatch and co-training tests: hand-made image+tabular batches for the three-head net
(tests/helpers/nets.py) and the train.py check that a run resumes exactly, exports and reloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def mm_batches(img_l, tab_l, y_l, img_u, tab_u, monitor=None):
    labeled = {"labels": y_l, "index": torch.arange(len(y_l)), "stil": {"pixel_values": img_l, "continuous_values": tab_l}}
    unlabeled = {"index": torch.arange(len(img_u)), "stil": {"pixel_values": img_u, "continuous_values": tab_u}}
    if monitor is not None:
        unlabeled["monitor_labels"] = monitor
    return labeled, unlabeled


def hand_inputs():
    img_l = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    tab_l = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]], requires_grad=True)
    # unlabelled fused logits: row 0 confidently class 1 (4 + 1), row 1 unsure, row 2 confidently class 2
    img_u = torch.tensor([[0.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    tab_u = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.1, 0.0], [0.0, 1.0, 3.0]], requires_grad=True)
    return mm_batches(img_l, tab_l, torch.tensor([0, 2]), img_u, tab_u, torch.tensor([1, 1, 2]))


def multimodal_argv(method: str, out: Path, cache: Path, *extra: str) -> list[str]:
    from tests._helpers import flags

    values = {
        "method": method, "model": "mmatch-tiny", "output_dir": str(out), "dataset_cache_dir": str(cache),
        "synthetic_num_samples": "200", "labeled_fraction": "0.2", "mu": "2", "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "64", "max_eval_samples": "32", "max_steps": "4", "eval_steps": "4", "save_steps": "2", "logging_steps": "1",
        "learning_rate": "0.01", "report_to": "none", "disable_tqdm": "true", "seed": "5", "start_epoch": "-1",
    }
    return flags(values, *extra)


def resume_export_reload(method: str, root: Path, cache: Path, state_keys: tuple[str, ...], *extra: str) -> list[dict]:
    """Run 4 steps; resume a copy of checkpoint-2 to step 4: identical checkpoints (model, teacher and
    method state), the export reloads with AutoModel and reproduces the run's test metrics."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    import modeling_stil  # noqa: F401
    from tests._helpers import run_train

    straight, resumed = root / "straight", root / "resumed"
    assert run_train(multimodal_argv(method, straight, cache, *extra)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    assert run_train(multimodal_argv(method, resumed, cache, "--resume_from_checkpoint", "latest", *extra)) == 0
    a = load_file(straight / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "checkpoint-4" / "model.safetensors")
    start = load_file(straight / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert a.keys() == b.keys() and set(state_keys) <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in state_keys:
        assert not torch.equal(a[key], start[key]), f"{key} did not change between steps 2 and 4"
    exported, reloaded = load_file(straight / "model.safetensors"), AutoModel.from_pretrained(straight)
    for name, tensor in reloaded.state_dict().items():
        if name in exported:
            assert torch.equal(tensor, exported[name]), name
    results = json.loads((straight / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    assert "image/accuracy" in results["test"] and "tabular/accuracy" in results["test"]
    return [json.loads(l) for l in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
