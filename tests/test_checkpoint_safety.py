"""Resuming reads no pickle that could run code: `load_checkpoint` only uses safetensors,
``torch.load(weights_only=True)`` and JSON, and still restores everything exactly."""

from __future__ import annotations

import inspect
import json
import os
import random

import numpy as np
import pytest
import torch

from modeling_stil.training import checkpointing as ckpt
from tests._helpers import fresh_accelerate_state


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    with fresh_accelerate_state():
        yield Accelerator(cpu=True)


@pytest.fixture
def only_safe_torch_load(monkeypatch):
    """torch.load fails unless weights_only=True; returns the list of files it read."""
    real = torch.load
    seen = []

    def guarded(f, *args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError(f"torch.load({f}) without weights_only=True")
        seen.append(os.path.basename(str(f)))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    return seen


def _setup(acc):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    model, opt, sched = acc.prepare(model, opt, sched)
    progress = ckpt.TrainerProgress(fingerprint={"method": "m", "model": "x"})
    acc.register_for_checkpointing(progress)
    return model, opt, sched, progress


def _step(model, opt, sched):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_load_checkpoint_is_exact_and_reads_nothing_unsafely(tmp_path, accelerator, only_safe_torch_load):
    model, opt, sched, progress = _setup(accelerator)
    for _ in range(3):
        _step(model, opt, sched)
    progress.step, progress.micro_step, progress.epoch = 3, 6, 1
    progress.best_metric, progress.best_step, progress.best_checkpoint = 0.1 + 0.2, 2, "checkpoint-2"
    path = ckpt.save_checkpoint(accelerator, tmp_path, progress, extra={"step": -1, "note": 1})
    assert json.loads((path / ckpt.STATE_FILENAME).read_text())["step"] == 3  # the progress wins over extra
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = sched.get_last_lr()
    expected_draws = _draws()
    _step(model, opt, sched)
    expected_after = {k: v.clone() for k, v in model.state_dict().items()}

    for _ in range(2):  # move everything on
        _step(model, opt, sched)
    progress.step, progress.best_metric, progress.best_checkpoint = 99, None, None

    ckpt.load_checkpoint(accelerator, path, progress)
    assert {"random_states_0.pkl", "optimizer.bin", "scheduler.bin"} <= set(only_safe_torch_load)
    assert "custom_checkpoint_0.pkl" not in only_safe_torch_load  # the progress came from JSON
    assert (progress.step, progress.micro_step, progress.epoch) == (3, 6, 1)
    assert progress.best_metric == 0.1 + 0.2 and progress.best_step == 2 and progress.best_checkpoint == "checkpoint-2"
    assert progress.fingerprint == {"method": "m", "model": "x"}
    for key, value in expected_state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert sched.get_last_lr() == expected_lr
    draws = _draws()
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    _step(model, opt, sched)  # optimizer moments restored: the next step matches too
    for key, value in expected_after.items():
        assert torch.equal(model.state_dict()[key], value), key


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_planted_pickle_never_runs(tmp_path, accelerator, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, opt, sched, progress = _setup(accelerator)
    progress.step = 1
    path = ckpt.save_checkpoint(accelerator, tmp_path, progress)
    # the pickled progress is never read: a planted object there is ignored
    torch.save({"step": _Boom()}, path / "custom_checkpoint_0.pkl")
    ckpt.load_checkpoint(accelerator, path, progress)
    assert progress.step == 1 and not (tmp_path / "pwned").exists()
    # a planted object in a file that is read is refused, naming the file
    rng = {**torch.load(path / "random_states_0.pkl", weights_only=False), "payload": _Boom()}
    torch.save(rng, path / "random_states_0.pkl")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="random_states_0.pkl with weights_only=True"):
        ckpt.load_checkpoint(accelerator, path, progress)
    torch.save({"state": {}, "param_groups": [], "payload": _Boom()}, path / "optimizer.bin")
    torch.save(rng | {"payload": 0}, path / "random_states_0.pkl")
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="refused by torch.load"):
        ckpt.load_checkpoint(accelerator, path, progress)
    assert not (tmp_path / "pwned").exists()


def test_other_registered_objects_load_with_weights_only(tmp_path, accelerator, only_safe_torch_load):
    class Counter:
        def __init__(self):
            self.value = torch.zeros(2)

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    _setup(accelerator)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    counter.value = torch.tensor([1.0, 2.0])
    progress = accelerator._custom_objects[0]
    path = ckpt.save_checkpoint(accelerator, tmp_path, progress)
    counter.value = torch.zeros(2)
    ckpt.load_checkpoint(accelerator, path, progress)
    assert torch.equal(counter.value, torch.tensor([1.0, 2.0])) and "custom_checkpoint_1.pkl" in only_safe_torch_load


def test_not_a_checkpoint(tmp_path, accelerator):
    _, _, _, progress = _setup(accelerator)
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="not a stil checkpoint"):
        ckpt.load_checkpoint(accelerator, tmp_path, progress)


def test_trainer_resume_reads_nothing_unsafely(tmp_path, only_safe_torch_load):
    """Through the Trainer, once Trainer.resume/load_best call ckpt.load_checkpoint."""
    from modeling_stil.training.trainer import Trainer

    if "load_checkpoint" not in inspect.getsource(Trainer.resume):
        pytest.skip("Trainer.resume still calls accelerator.load_state (one-line change pending)")
    from tests.helpers.toy_trainer import make_trainer, weights

    with fresh_accelerate_state():
        full = make_trainer(tmp_path / "a", optimizer="adamw")
        full.train()
        reference = weights(full)
    with fresh_accelerate_state():
        make_trainer(tmp_path / "b", optimizer="adamw", stop_after_steps=4).train()
    with fresh_accelerate_state():
        second = make_trainer(tmp_path / "b", optimizer="adamw", resume_from_checkpoint="latest")
        second.train()
        assert "random_states_0.pkl" in only_safe_torch_load
        resumed = weights(second)
        for key in reference:
            assert torch.equal(reference[key], resumed[key]), key
        second.load_best()
