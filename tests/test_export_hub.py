"""A tiny real job end to end: export (safetensors + processor + card), reload, evaluate.py,
and the Hub upload at its boundary (offline failure after saving; the exact files and card sent)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests._helpers import run_train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), "--dataset_cache_dir", str(cache), "--synthetic_num_samples", "400",
        "--labeled_fraction", "0.3", "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "3", *extra,
    ]


@pytest.fixture(scope="module")
def offline_push_run(tmp_path_factory):
    """`train.py ... --push_to_hub` with the Hub unreachable: everything saved, then one error line."""
    import contextlib
    import io
    import os

    root = tmp_path_factory.mktemp("export")
    out = root / "run"
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = run_train(tiny_argv(out, root / "cache", "--push_to_hub", "true", "--hub_model_id", "someone/stil-tiny"))
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return code, stderr.getvalue(), out, root / "cache"


def test_offline_push_fails_with_one_line_after_saving(offline_push_run):
    code, stderr, out, _ = offline_push_run
    assert code == 1
    lines = [l for l in stderr.splitlines() if l.startswith("train.py:")]
    assert len(lines) == 1, stderr
    assert "push to https://huggingface.co/someone/stil-tiny failed" in lines[0]
    assert str(out) in lines[0] and "scripts/push_to_hub.py" in lines[0]
    for name in ("config.json", "model.safetensors", "processor_config.json", "README.md", "eval_results.json",
                 "run_config.yaml", "run_info.json", "logs/metrics.jsonl", "plots/losses.png", "plots/validation.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("pytorch_model*"))


def test_run_files_record_config_seed_versions_and_split(offline_push_run):
    _, _, out, _ = offline_push_run
    config = yaml.safe_load((out / "run_config.yaml").read_text())
    assert config["seed"] == 3 and config["max_steps"] == 6 and config["method"] == "supervised"
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 3 and info["versions"]["torch"] and info["versions"]["accelerate"]
    assert len(info["labeled_indices"]) == round(0.3 * info["split_sizes"]["train"])
    assert "git_commit" in info and info["fingerprint"]["method"] == "supervised"


def test_export_reloads_and_matches(offline_push_run):
    import torch
    from transformers import AutoModel

    import modeling_stil  # noqa: F401

    _, _, out, _ = offline_push_run
    results = json.loads((out / "eval_results.json").read_text())
    assert results["reload_check"]["matches"] is True
    assert results["reload_check"]["metrics"]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    model = AutoModel.from_pretrained(str(out))
    assert model.dtype == torch.float32 and not model.training is None


def test_model_card_metadata_and_plots(offline_push_run):
    _, _, out, _ = offline_push_run
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert {"stil", "semi-supervised", "supervised", "classification", "image", "tabular"} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    metric = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    test = json.loads((out / "eval_results.json").read_text())["test"]
    assert metric["accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)
    assert "auroc_skipped_classes" not in metric and "num_samples" not in metric  # counters, not scores
    assert results[0]["dataset"]["split"] == "test"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert "plots/losses.png" in images and all((out / p).is_file() for p in images)
    assert "seed: 3" in card.text and "torch" in card.text and "max_steps: 6" in card.text
    config = yaml.safe_load((out / "run_config.yaml").read_text())  # the card states the settings the run used
    assert (f"- optimizer: {config['optimizer']} (weight decay {config['weight_decay']}), learning rate "
            f"{config['learning_rate']}, schedule {config['lr_scheduler']} per {config['lr_scheduler_interval']}, "
            f"warm-up {config['warmup']} of the steps") in card.text


def test_evaluate_script_prints_and_writes(offline_push_run, tmp_path):
    """Run exactly as a user does (`python scripts/evaluate.py`, scripts/ first on sys.path), which
    once let scripts/evaluate.py shadow the `evaluate` library."""
    import os
    import subprocess

    _, _, out, cache = offline_push_run
    dataset = next(cache.iterdir())
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(out), "--dataset", str(dataset),
         "--split", "test", "--write"],
        cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    expected = json.loads((out / "eval_results.json").read_text())
    assert printed["accuracy"] == pytest.approx(expected["test"]["accuracy"])
    assert expected["evaluations"][f"{dataset.name}:test"]["accuracy"] == pytest.approx(printed["accuracy"])


def test_push_sends_the_export_without_checkpoints(offline_push_run, monkeypatch):
    import huggingface_hub

    from modeling_stil.training.hub import push_folder

    _, _, out, _ = offline_push_run
    assert (out / "checkpoints").is_dir()
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, **kwargs):
            sent["create"] = (repo_id, kwargs)

        def create_commit(self, *, repo_id, operations, **kwargs):
            sent["files"] = sorted(op.path_in_repo for op in operations)
            card = next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md")
            sent["card"] = card.decode() if isinstance(card, bytes) else Path(card).read_text()
            sent["repo_id"] = repo_id
            return "https://huggingface.co/someone/stil-tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = push_folder(out, "someone/stil-tiny", token="tok", private=True)
    assert result.endswith("/commit/abc")
    assert sent["create"] == ("someone/stil-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    files = set(sent["files"])
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "eval_results.json",
            "run_config.yaml", "plots/losses.png", "logs/metrics.jsonl"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)
    assert "model-index" in sent["card"] and sent["token"] == "tok"


def test_push_refuses_a_folder_without_export(tmp_path):
    from modeling_stil.training.hub import HubUploadError, push_folder

    with pytest.raises(HubUploadError, match="no exported model"):
        push_folder(tmp_path, "someone/x")


def test_resume_refuses_other_method(offline_push_run):
    """An incompatible checkpoint (other method) is refused with the reason, through train.py."""
    import contextlib
    import io

    _, _, out, cache = offline_push_run
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = run_train(tiny_argv(out, cache, "--method", "fixmatch", "--mu", "2", "--resume_from_checkpoint", "latest"))
    assert code == 1
    assert "method: checkpoint 'supervised', this run 'fixmatch'" in stderr.getvalue()
