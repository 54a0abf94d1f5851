"""--dataloader_num_workers auto: the rule by hand-computed cases; persistent workers and pinned memory as decided."""

from __future__ import annotations

import pytest

from data_utils import loaders as loaders_module
from data_utils.loaders import LoaderError, auto_num_workers, build_eval_loader, build_train_loaders, resolve_num_workers
from tests.helpers.loader_data import CFG


@pytest.mark.parametrize("cpus, local_processes, device, expected", [
    (2, 1, "cpu", 0),      # CPU training: the step needs the cores (loading is a few per cent of it)
    (64, 1, "cpu", 0),     # whatever the machine
    (1, 1, "cuda", 0),     # one core: the loop itself
    (2, 1, "cuda", 1),     # 2 cores: one for the loop, one worker
    (4, 1, "cuda", 3),
    (9, 1, "cuda", 8),
    (17, 1, "cuda", 16),
    (64, 1, "cuda", 16),   # capped: 16 workers
    (64, 8, "cuda", 7),    # 8 GPUs share 64 cores: 8 each, one kept for the loop
    (192, 8, "cuda", 16),  # 24 each: capped
    (16, 8, "cuda", 1),
    (8, 8, "cuda", 0),     # one core per process: no workers
    (3, 2, "cuda", 0),     # share rounds down
])
def test_auto_rule(cpus, local_processes, device, expected):
    assert auto_num_workers(cpus, local_processes, device) == expected


def test_auto_uses_this_process_cores(monkeypatch):
    monkeypatch.setattr(loaders_module, "available_cpus", lambda: 6)
    assert resolve_num_workers("auto", 1, "cuda") == 5
    assert resolve_num_workers("auto", 2, "cuda") == 2
    assert resolve_num_workers("auto", 1, "cpu") == 0
    assert resolve_num_workers(3, 1, "cpu") == 3  # an explicit count is kept
    with pytest.raises(LoaderError, match="dataloader_num_workers"):
        resolve_num_workers(-1)


def test_argument_default_is_auto_and_accepts_counts():
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.recipe_reading import ArgumentError

    assert parse_run_arguments([]).data.dataloader_num_workers == "auto"
    assert parse_run_arguments(["--dataloader_num_workers", "3"]).data.dataloader_num_workers == 3
    with pytest.raises(ArgumentError, match="dataloader_num_workers"):
        parse_run_arguments(["--dataloader_num_workers", "many"])


def test_training_loaders_keep_workers_and_pin_on_request(loader_data):
    dd, meta, schema = loader_data
    stream = build_train_loaders(dd, meta, schema, labeled_views={"weak": "weak"},
                                 unlabeled_views={"weak": "weak", "strong": "strong"}, view_config=CFG,
                                 batch_size=2, mu=3, num_workers=2, pin_memory=True)
    for loader in (stream.labeled_loader, stream.unlabeled_loader):
        assert loader.num_workers >= 1 and loader.persistent_workers and loader.pin_memory
    # eval loaders fork their workers per evaluation (cheap on Linux) instead of keeping them idle between evaluations
    val = build_eval_loader(dd, meta, schema, "validation", 4, CFG, num_workers=2, pin_memory=True)
    assert val.pin_memory and not val.persistent_workers
    serial = build_train_loaders(dd, meta, schema, labeled_views={"weak": "weak"}, view_config=CFG, batch_size=2, mu=3)
    assert serial.labeled_loader.num_workers == 0 and not serial.labeled_loader.pin_memory


@pytest.mark.parametrize("device, pinned, workers", [("cpu", False, 0), ("cuda", True, 3)])
def test_job_resolves_auto_and_pins_on_cuda_only(loader_data, monkeypatch, device, pinned, workers):
    """What train.py's job gives the loaders: `auto` resolved for the device, pinned memory on CUDA only."""
    from types import SimpleNamespace

    import torch

    from modeling_stil.methods.base import SSLMethod
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.data_setup import build_loaders

    class Method:
        stream_defaults = SSLMethod.stream_defaults
        labeled_views, unlabeled_views, meta_views, label_free = {"weak": "weak"}, {"weak": "weak", "strong": "strong"}, None, False
        eval_views = {"eval": "eval"}

    monkeypatch.setattr(loaders_module, "available_cpus", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    dd, meta, schema = loader_data
    args = parse_run_arguments(["--per_device_train_batch_size", "2", "--mu", "3", "--per_device_eval_batch_size", "4"])
    accelerator = SimpleNamespace(device=torch.device(device), num_processes=1, process_index=0)
    stream, evals = build_loaders(args, Method(), {"image_size": 16}, dd, meta, schema, accelerator)
    assert stream.num_workers == workers
    for loader in (stream.labeled_loader, stream.unlabeled_loader, evals["validation"]):
        assert loader.pin_memory is pinned
    assert stream.unlabeled_loader.num_workers == workers
    assert stream.unlabeled_loader.persistent_workers is (workers > 0)
