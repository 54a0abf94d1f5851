"""Trainer loop tests on tiny test doubles (a linear/dropout model, a deterministic stream)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modeling_stil.training import checkpointing as ckpt
from modeling_stil.training.divergence import NonFiniteLossError
from modeling_stil.training.optim import lr_lambda_factory
from modeling_stil.training.tracking import LogAccumulator, TrackerUnavailableError, resolve_trackers
from tests._helpers import fresh_accelerate_state
from tests.helpers.toy_trainer import N_CLASSES, N_ROWS, ToyMethod, ToyModel, make_trainer, toy_data, weights


@pytest.fixture(autouse=True)
def _reset_accelerate():
    with fresh_accelerate_state():
        yield


def test_resume_is_exact(tmp_path):
    full = make_trainer(tmp_path / "a", optimizer="adamw")
    full.train()
    reference = weights(full)

    first = make_trainer(tmp_path / "b", optimizer="adamw", stop_after_steps=4)
    out = first.train()
    assert out["finished"] is False and out["stopped_at_step"] == 4
    assert ckpt.list_checkpoints(tmp_path / "b" / "run" / "checkpoints")[-1].name == "checkpoint-4"
    second = make_trainer(tmp_path / "b", optimizer="adamw", resume_from_checkpoint="latest")
    second.train()
    assert second.progress.step == 8
    resumed = weights(second)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert int(resumed["after_steps"]) == 8  # after_optimizer_step ran once per optimisation step
    # the JSONL of the resumed run has no duplicated steps and both halves
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 8


def _logged(run_dir):
    """The JSONL records without the timing (samples/s is the only value a resume may change)."""
    records = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_second"} for r in records]


def test_resumed_run_logs_the_numbers_of_an_uninterrupted_run(tmp_path):
    """Checkpoints fall inside a logging window (every 3 steps, logs every 4): the first window logged
    after a resume averages all its steps, whether the run was killed or stopped with stop_after_steps."""
    settings = dict(optimizer="adamw", logging_steps=4, save_steps=3, save_total_limit=None)
    make_trainer(tmp_path / "a", **settings).train()
    straight = _logged(tmp_path / "a" / "run")
    assert [r["step"] for r in straight if r["split"] == "train"] == [4, 8]

    # killed after checkpoint-6 (steps 5 and 6 of the window 5-8 were trained): resume from it
    make_trainer(tmp_path / "b", **settings).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoints" / "checkpoint-6"
    make_trainer(tmp_path / "b", **settings, resume_from_checkpoint=str(checkpoint)).train()
    assert _logged(tmp_path / "b" / "run") == straight

    # stopped at step 6 (stop_after_steps), then resumed
    make_trainer(tmp_path / "c", **settings, stop_after_steps=6).train()
    make_trainer(tmp_path / "c", **settings, resume_from_checkpoint="latest").train()
    assert _logged(tmp_path / "c" / "run") == straight


def test_resume_without_restoring_state_differs(tmp_path):
    """Guards the test above: a fresh run on the second half does NOT match (state matters)."""
    full = make_trainer(tmp_path / "a")
    full.train()
    naive = make_trainer(tmp_path / "c", max_steps=8)
    naive.progress.micro_step = naive.progress.step = 4  # data position only, no weights/optimizer/RNG
    naive.train()
    assert any(not torch.equal(a, b) for a, b in zip(weights(full).values(), weights(naive).values()))


def test_incompatible_checkpoint_is_refused(tmp_path):
    first = make_trainer(tmp_path, stop_after_steps=2, fingerprint=ckpt.make_fingerprint("toy", {"model_type": "x", "h": 1}, {"rows": 96}))
    first.train()
    other = make_trainer(
        tmp_path, resume_from_checkpoint="latest",
        fingerprint=ckpt.make_fingerprint("fixmatch", {"model_type": "x", "h": 2}, {"rows": 97}),
    )
    with pytest.raises(ckpt.IncompatibleCheckpointError) as error:
        other.train()
    message = str(error.value)
    assert "method: checkpoint 'toy', this run 'fixmatch'" in message
    assert "model architecture" in message and "rows: 96 vs 97" in message


class NaNMethod(ToyMethod):
    nan_at_step = 5


def test_nan_loss_stops_with_step_terms_and_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, method_cls=NaNMethod, save_steps=2, eval_steps=100, logging_steps=3)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "step 6" in message  # the 6th optimisation step (state.step == 5)
    assert '"sup_loss": NaN' in message or "nan" in message.lower()
    good = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    assert str(good) in message and good.is_dir()
    # no checkpoint was written from NaN weights
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-6").exists()


def test_rotation_keeps_last_k_and_best(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, eval_steps=2, save_total_limit=1)
    trainer.train()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    best = trainer.progress.best_checkpoint
    assert "checkpoint-12" in names and best in names and len(names) <= 2
    assert not list((tmp_path / "run" / "checkpoints").glob(".*partial*"))


def test_best_selection_and_test(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, eval_steps=2, learning_rate=0.1)
    trainer.train()
    history = [json.loads(l) for l in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in history if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [2, 4, 6, 8, 10]
    best = max(validation, key=lambda r: r["accuracy"])  # first of ties wins (strict improvement)
    assert trainer.progress.best_step == best["step"]
    trainer.load_best()
    again = trainer.evaluate("validation").metrics
    assert again["accuracy"] == pytest.approx(best["accuracy"])
    assert (tmp_path / "run" / "plots" / "losses.png").is_file()
    assert (tmp_path / "run" / "plots" / "pseudo_labels.png").is_file()


def test_evaluate_returns_the_metrics_and_the_predictions_the_plots_draw(tmp_path):
    trainer = make_trainer(tmp_path)
    evaluation = trainer.evaluate("validation")
    _, labels = toy_data(1)
    assert evaluation.metrics["num_samples"] == N_ROWS
    assert evaluation.predictions.split == "validation" and evaluation.predictions.logits.shape == (N_ROWS, N_CLASSES)
    torch.testing.assert_close(evaluation.predictions.references, labels)
    accuracy = float((evaluation.predictions.logits.argmax(-1) == labels).float().mean())
    assert evaluation.metrics["accuracy"] == pytest.approx(accuracy)
    written = trainer.write_plots(evaluation.predictions)
    assert tmp_path / "run" / "plots" / "confusion_matrix.png" in written


@pytest.mark.parametrize("scope", ["matrices", "all"])
def test_weight_decay_scope(scope):
    """'matrices' (default) exempts biases and 1-d parameters; 'all' decays every parameter, as the
    STiL / TIP originals' single Adam group does (tests/test_golden_*.py compare that step)."""
    from types import SimpleNamespace

    from modeling_stil.training.optim import build_optimizer

    method = ToyMethod(ToyModel())
    args = SimpleNamespace(optimizer="adam", learning_rate=0.1, weight_decay=0.01, weight_decay_scope=scope, adam_beta1=0.9, adam_beta2=0.999)
    optimizer = build_optimizer(method, args, "cpu")
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in method.named_parameters():
        exempt = scope == "matrices" and (p.ndim <= 1 or name.endswith(".bias"))
        assert decay[id(p)] == (0.0 if exempt else 0.01), name
    assert len(set(decay.values())) == (2 if scope == "matrices" else 1)


def test_early_stopping_counts_evaluations_without_an_improvement_above_min_delta(tmp_path):
    """Lightning's EarlyStopping (the STiL originals': patience 100, min_delta 1e-4): the first
    evaluation sets the best; accuracy can never beat it by more than 1.0, so the run stops after
    `patience` further evaluations, with a checkpoint, and counts as finished (selection and export go on)."""
    trainer = make_trainer(tmp_path, max_steps=40, eval_steps=2, learning_rate=0.1,
                           early_stopping_patience=3, early_stopping_min_delta=1.0)
    results = trainer.train()
    assert results["early_stopped_at_step"] == 8 and results["stopped_at_step"] == 8 and results["finished"]
    assert trainer.progress.early_stopping_wait == 3
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-8").is_dir()
    # with min_delta 0 an improving run keeps going past that point
    again = make_trainer(tmp_path / "b", max_steps=12, eval_steps=2, learning_rate=0.1, early_stopping_patience=100)
    assert "early_stopped_at_step" not in again.train() and again.progress.step == 12


def test_gradient_accumulation_matches_large_batch(tmp_path):
    class NoDropout(ToyMethod):
        def __init__(self, model, args=None):
            super().__init__(model, args)
            self.model.net[2].p = 0.0

    a = make_trainer(tmp_path / "a", method_cls=NoDropout, batch_size=16, max_steps=3, optimizer="sgd", warmup=0)
    a.train()
    b = make_trainer(tmp_path / "b", method_cls=NoDropout, batch_size=8, max_steps=3, optimizer="sgd", warmup=0, gradient_accumulation_steps=2)
    b.train()
    for (k, va), vb in zip(weights(a).items(), weights(b).values()):
        if va.is_floating_point():
            torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)
    assert int(weights(b)["after_steps"]) == 3


def test_epoch_end_hook_and_max_steps_from_epochs(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=-1, num_train_epochs=2, eval_steps=None)
    trainer.train()
    assert trainer.max_steps == 2 * (N_ROWS // 8)
    assert trainer.unwrapped.epoch_ends == 2


def test_lr_schedule():
    f = lr_lambda_factory("cosine", 100, 10, "step", 10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    g = lr_lambda_factory("cosine", 100, 0, "epoch", 10)
    assert g(10) == g(19) != g(20)
    h = lr_lambda_factory("fixmatch_cosine", 100, 0, "step", 10)
    assert h(100) == pytest.approx(math.cos(7 * math.pi / 16))


def test_log_accumulator_means_without_item_calls():
    acc = LogAccumulator()
    acc.add({"loss": torch.tensor(1.0), "mask_ratio": torch.tensor(0.0)})
    acc.add({"loss": torch.tensor(3.0)})
    reduced = acc.reduce(lambda t: t * 2)  # a 2-process sum of identical values
    assert reduced == {"loss": 2.0, "mask_ratio": 0.0}
    assert not acc


def test_log_accumulator_skips_undefined_values_per_key():
    acc = LogAccumulator()
    acc.add({"pseudo_label_accuracy": torch.tensor(float("nan")), "loss": torch.tensor(1.0)})
    acc.add({"pseudo_label_accuracy": torch.tensor(0.5), "loss": torch.tensor(2.0)})
    acc.add({"pseudo_label_accuracy": torch.tensor(1.0), "never_defined": torch.tensor(float("nan"))})
    reduced = acc.reduce()
    assert reduced["pseudo_label_accuracy"] == 0.75 and reduced["loss"] == 1.5
    assert math.isnan(reduced["never_defined"])


def test_missing_tracker_fails_loudly():
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(TrackerUnavailableError, match="pip install wandb"):
            resolve_trackers(["tensorboard", "wandb"])
    assert resolve_trackers(["none"]) == []
    assert resolve_trackers("tensorboard") == ["tensorboard"]
    with pytest.raises(ValueError, match="unknown tracker"):
        resolve_trackers(["tensorbored"])


@pytest.mark.slow
def test_cli_default_job_end_to_end(tmp_path):
    """`accelerate launch --config_file accelerate_configs/cpu.yaml train.py` with the default recipe,
    kept small by command-line overrides: trains, selects, tests, exports, reloads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "run"
    command = [str(accelerate), "launch", "--config_file", str(root / "accelerate_configs" / "cpu.yaml"),
               "--num_cpu_threads_per_process", "1", str(root / "train.py"),
               "--output_dir", str(out), "--dataset_cache_dir", str(tmp_path / "cache"), "--synthetic_num_samples", "600",
               "--max_steps", "20", "--eval_steps", "10", "--disable_tqdm", "true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stopped_at_step"] == 20 and summary["reload_check"]["matches"] is True
    assert set(summary["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auroc"}
    for name in ("model.safetensors", "config.json", "processor_config.json", "README.md", "plots/losses.png",
                 "plots/validation.png", "plots/learning_rate.png"):
        assert (out / name).is_file(), name
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard is the default tracker"


def test_compile_model_compiles_the_model_not_the_method_and_keeps_parameter_names():
    import torch

    from modeling_stil.methods.base import get_method_class
    from modeling_stil.presets import create_model
    from modeling_stil.training.trainer import compile_model

    torch.manual_seed(0)
    model = create_model("image-tiny", num_labels=3)
    method = get_method_class("fixmatch")(model)
    names = list(method.state_dict())
    pixel_values = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(pixel_values=pixel_values).logits
    compile_model(method, backend="eager")
    assert model._compiled_call_impl is not None and method._compiled_call_impl is None
    assert list(method.state_dict()) == names  # checkpoints and exports keep their keys
    torch.testing.assert_close(model(pixel_values=pixel_values).logits, expected)
