"""The method contract v2, each extension point through the real train.py path with a toy method
(tests/toy_methods.py): setup sizes, method-owned evaluation and selection, phases and parameter
groups, meta and label-free streams, hooks after the optimizer step, --init_from, regression
standardisation, multistep LR, and no ground truth of unlabelled rows in any loss."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests._helpers import TOY_METADATA, TOY_SCHEMA, flags, fresh_accelerate_state, run_train

TOY = "tests.toy_methods:"


def base_argv(out: Path, cache: Path, *extra: str, task: str = "multimodal") -> list[str]:
    """A tiny run's arguments; ``extra`` flags replace the defaults of the same name."""
    values = {
        "output_dir": str(out), "dataset_cache_dir": str(cache), "synthetic_task": task,
        "synthetic_num_samples": "300", "labeled_fraction": "0.2", "mu": "2",
        "per_device_train_batch_size": "4", "per_device_eval_batch_size": "64", "max_steps": "6",
        "eval_steps": "3", "logging_steps": "3", "learning_rate": "0.01", "report_to": "none",
        "disable_tqdm": "true", "seed": "3",
    }
    return flags(values, *extra)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def method_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")


# ------------------------------------------------------------------------------------ setup + resume
def test_setup_sizes_buffers_before_prepare_and_they_resume_exactly(tmp_path, synthetic_cache):
    argv = base_argv(tmp_path / "a", synthetic_cache, "--method", TOY + "BankMethod", "--model", "multimodal-concat-tiny",
                     "--save_steps", "3")
    assert run_train(argv) == 0
    stopped = base_argv(tmp_path / "b", synthetic_cache, "--method", TOY + "BankMethod", "--model", "multimodal-concat-tiny",
                        "--save_steps", "3")
    assert run_train(stopped + ["--stop_after_steps", "3"]) == 0
    assert run_train(stopped + ["--resume_from_checkpoint", "latest"]) == 0
    a, b = method_state(tmp_path / "a", 6), method_state(tmp_path / "b", 6)
    train_rows = json.loads((tmp_path / "a" / "run_info.json").read_text())["split_sizes"]["train"]
    assert a["bank"].shape == (train_rows,)  # the size came from setup(DataInfo), before prepare
    assert int(a["writes"]) == 6
    assert torch.count_nonzero(a["bank"]) > 0
    for key in ("bank", "class_sums", "writes"):
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------ evaluation + selection
def test_method_owned_evaluation_scores_every_head_and_selects_by_lowest_loss(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    assert run_train(base_argv(out, synthetic_cache, "--method", TOY + "TwoHeadEvalMethod", "--model", "multimodal-concat-tiny",
                               "--max_steps", "9")) == 0
    validation = [r for r in history(out) if r["split"] == "validation"]
    assert {"accuracy", "image/accuracy", "loss"} <= set(validation[0])
    best = min(validation, key=lambda r: r["loss"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["metric_for_best_model"] == "loss"
    assert results["best_step"] == best["step"]
    assert results["reload_check"]["matches"]  # the export check ran through the same evaluation_step


def test_selection_last_keeps_the_last_step(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    assert run_train(base_argv(out, synthetic_cache, "--method", TOY + "LastStepMethod", "--model", "multimodal-concat-tiny")) == 0
    assert json.loads((out / "eval_results.json").read_text())["best_step"] == 6


# -------------------------------------------------------------------------- phases + parameter groups
def test_second_phase_sees_the_first_phase_update_with_its_own_parameter_group(tmp_path, synthetic_cache):
    from modeling_stil.methods.base import get_method_class
    from modeling_stil.training.optim import build_optimizer
    from modeling_stil.presets import create_model
    from modeling_stil.training.arguments import TrainingArguments

    out = tmp_path / "run"
    assert run_train(base_argv(out, synthetic_cache, "--method", TOY + "TwoPhaseMethod", "--model", "multimodal-concat-tiny",
                               "--max_steps", "2", "--eval_steps", "2")) == 0
    state = method_state(out, 2)
    assert state["phase_calls"].tolist() == [2, 2]
    assert state["seen"][0] != state["seen"][1], "phase 1 ran at the weights phase 0 had before its step"

    cls = get_method_class(TOY + "TwoPhaseMethod")
    method = cls(create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA))
    optimizer = build_optimizer(method, TrainingArguments(learning_rate=0.01), "cpu")
    head = {id(p) for n, p in method.model.named_parameters() if "classifier" in n}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == (0.5 if in_head.pop() else 0.01)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(method.trainable_parameters())


@pytest.mark.parametrize("flag, message", [
    (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps 1"),
    (["--torch_compile", "true"], "torch.compile"),
])
def test_phases_refuse_what_they_cannot_support(tmp_path, synthetic_cache, capsys, flag, message):
    out = tmp_path / "run"
    code = run_train(base_argv(out, synthetic_cache, "--method", TOY + "TwoPhaseMethod", "--model", "multimodal-concat-tiny", *flag))
    assert code == 1
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------- streams
def test_meta_stream_is_labelled_and_shuffled_independently(tmp_path, synthetic_cache):
    from data_utils.loaders import build_train_loaders
    from data_utils.views import ViewConfig
    from data_utils.io import load_dataset

    out = tmp_path / "run"
    assert run_train(base_argv(out, synthetic_cache, "--method", TOY + "MetaStreamMethod", "--model", "multimodal-concat-tiny")) == 0
    info = json.loads((out / "run_info.json").read_text())
    seen = method_state(out, 6)["meta_rows_seen"]
    assert set(torch.nonzero(seen).flatten().tolist()) <= set(info["labeled_indices"])

    ds, meta, schema = load_dataset(info["dataset"])
    loaders = build_train_loaders(ds, meta, schema, labeled_views={"weak": "eval"}, meta_views={"weak": "eval"},
                                  view_config=ViewConfig(image_size=32, seed=3), batch_size=4, mu=2, seed=3)
    labeled, _ = next(loaders.iterate(0))
    assert set(labeled["meta"]["index"].tolist()) <= set(info["labeled_indices"])
    assert labeled["meta"]["index"].tolist() != labeled["index"].tolist()


def test_label_free_stream_needs_no_label_column_and_covers_every_row(synthetic_cache, tmp_path):
    from data_utils.loaders import build_train_loaders
    from data_utils.views import ViewConfig
    from data_utils.io import load_dataset

    out = tmp_path / "seed_run"
    assert run_train(base_argv(out, synthetic_cache, "--method", "supervised", "--model", "multimodal-concat-tiny", "--max_steps", "1",
                               "--export", "false")) == 0
    ds, meta, schema = load_dataset(json.loads((out / "run_info.json").read_text())["dataset"])
    ds = ds.copy()
    ds["train"] = ds["train"].remove_columns([meta.label_column, meta.labeled_column])
    loaders = build_train_loaders(ds, meta, schema, labeled_views=None, unlabeled_views={"v": "eval"}, label_free=True,
                                  view_config=ViewConfig(image_size=32, seed=0), batch_size=8, mu=1)
    assert loaders.steps_per_epoch == len(ds["train"]) // 8
    rows = []
    for step, (labeled, unlabeled) in zip(range(loaders.steps_per_epoch), loaders.iterate(0)):
        assert labeled is None
        rows += unlabeled["index"].tolist()
    assert sorted(rows) == list(range(loaders.steps_per_epoch * 8))[: len(rows)] or len(set(rows)) == len(rows)
    assert len(set(rows)) == loaders.steps_per_epoch * 8


def test_stream_options_come_from_the_method_and_the_recipe_overrides_them():
    from modeling_stil.methods.base import SSLMethod
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.data_setup import stream_options

    class Pretraining(SSLMethod):
        stream_defaults = {**SSLMethod.stream_defaults, "corruption_pool": "stream", "epoch": "longest"}

    args = parse_run_arguments(["--unlabeled_includes_labeled", "true"])
    options = stream_options(args, Pretraining(torch.nn.Linear(1, 1)))
    assert options == {"unlabeled_includes_labeled": True, "corruption_pool": "stream", "augmentation_rate": None,
                       "epoch": "longest"}


def test_epoch_longest_counts_the_longer_stream(synthetic_cache, tmp_path):
    from data_utils.loaders import build_train_loaders
    from data_utils.views import ViewConfig
    from data_utils.io import load_dataset

    out = tmp_path / "seed_run"
    assert run_train(base_argv(out, synthetic_cache, "--method", "supervised", "--model", "multimodal-concat-tiny", "--max_steps", "1",
                               "--export", "false")) == 0
    ds, meta, schema = load_dataset(json.loads((out / "run_info.json").read_text())["dataset"])
    kwargs = dict(labeled_views={"w": "eval"}, unlabeled_views={"w": "eval"}, view_config=ViewConfig(image_size=32),
                  batch_size=2, mu=20)
    a = build_train_loaders(ds, meta, schema, **kwargs)
    b = build_train_loaders(ds, meta, schema, epoch="longest", **kwargs)
    assert a.steps_per_epoch == a.unlabeled_sampler.batches_per_pass
    assert b.steps_per_epoch == max(a.labeled_sampler.batches_per_pass, a.unlabeled_sampler.batches_per_pass)
    assert b.steps_per_epoch > a.steps_per_epoch


# ------------------------------------------------------------------------------------------- hooks
def test_epoch_end_runs_after_the_optimizer_step_never_inside_an_accumulation_window(tmp_path, synthetic_cache):
    """gas 2 and 3 micro-batches per epoch: epochs end inside windows; the hook waits for the step."""
    import sys

    from tests._helpers import ROOT

    sys.path.insert(0, str(ROOT))
    import train
    from modeling_stil.training import job

    calls = {}
    original = job.Trainer.train

    def spy(self):
        out = original(self)
        calls["calls"] = list(self.unwrapped.calls)
        calls["spe"] = self.train_stream.steps_per_epoch
        return out

    job.Trainer.train = spy
    try:
        with fresh_accelerate_state():
            code = train.main(base_argv(tmp_path / "run", synthetic_cache, "--method", TOY + "EpochHookMethod",
                                        "--model", "multimodal-concat-tiny", "--gradient_accumulation_steps", "2",
                                        "--per_device_train_batch_size", "12", "--max_steps", "4", "--eval_steps", "4"))
    finally:
        job.Trainer.train = original
    assert code == 0
    spe = calls["spe"]  # 36 labelled rows / 12 = 3 micro-batches per epoch
    assert spe == 3
    # micro-steps 3 and 6 end epochs 0 and 1; they fall in optimizer steps 2 and 3 (micro 4 and 6)
    assert [(after, epoch) for after, epoch, _ in calls["calls"]] == [(2, 0), (3, 1)]


# --------------------------------------------------------------------------- no ground truth leaks
def _perturb_monitors(batch):
    if isinstance(batch, dict):
        return {k: (_scramble(v) if k.startswith("monitor_") else _perturb_monitors(v)) for k, v in batch.items()}
    return batch


def _scramble(value: torch.Tensor) -> torch.Tensor:
    if value.is_floating_point():
        return value * -3.0 + 7.0
    return (value + 1) % max(2, int(value.max()) + 2)


def _method_cases():
    from modeling_stil.methods.base import METHODS, get_method_class

    get_method_class("supervised")  # registers the built-in methods
    cases = []
    for name, cls in sorted(METHODS.items()):
        if ":" in name:
            continue
        for task in ("multimodal", "image", "landmarks"):
            kind = {"multimodal": "classification", "image": "classification", "landmarks": "landmarks"}[task]
            if kind not in cls.supported_tasks:
                continue
            if task in ("image", "landmarks") and "tabular" in cls.required_modalities:
                continue
            cases.append((name, task))
    return cases


MODEL_FOR = {"multimodal": "multimodal-concat-tiny", "image": "image-tiny", "landmarks": "tcdcnn"}
MODEL_FOR_METHOD = {"stil": "stil-tiny", "tip_pretrain": "tip-tiny"}
# image-only Match-family variants refuse a model that reads tabular input (image-tiny reads the images)
MODEL_FOR_METHOD.update({"simmatch": "image-tiny", "comatch": "image-tiny"})
MODEL_FOR_METHOD.update({"mmatch": "mmatch-tiny", "co_training": "mmatch-tiny"})  # three-head network
# landmark runs need views that keep targets on the pixels
TASK_ARGS = {"landmarks": ("--labeled_view", "translate")}


@pytest.mark.parametrize("name, task", _method_cases())
def test_monitor_labels_never_reach_any_loss(tmp_path, synthetic_cache, name, task):
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.job import assemble
    from modeling_stil.training.accelerator import make_accelerator

    model = MODEL_FOR_METHOD.get(name) or MODEL_FOR[task]
    extra = TASK_ARGS.get(task, ()) if name == "supervised" else ()
    argv = base_argv(tmp_path / "run", synthetic_cache, "--method", name, "--model", model, *extra, task=task)
    with fresh_accelerate_state():
        args = parse_run_arguments(argv)
        job = assemble(args, make_accelerator(args))
    method = job["method"]
    labeled, unlabeled = next(job["train_stream"].iterate(0))
    from modeling_stil.methods.base import TrainState

    state = TrainState(step=10_000, epoch=10_000, max_steps=20_000, task=job["metadata"].task,
                       num_labels=job["metadata"].num_labels)

    def loss_of(lab, unl):
        clone = copy.deepcopy(method)
        torch.manual_seed(0)
        loss, _ = clone.training_step(lab, unl, state)
        return loss.detach()

    reference = loss_of(labeled, unlabeled)
    perturbed = loss_of(_perturb_monitors(labeled), _perturb_monitors(unlabeled))
    assert torch.isfinite(reference)
    assert torch.equal(reference, perturbed), f"{name}: ground truth of unlabelled rows changed the loss"
    if unlabeled is not None:
        for key, view in unlabeled.items():
            if isinstance(view, dict):
                assert "labels" not in view, f"unlabelled view {key!r} carries ground truth under 'labels'"


# ------------------------------------------------------------------------------------------ init_from
def _save_model(name: str, path: Path, schema=TOY_SCHEMA, metadata=TOY_METADATA, **overrides):
    from modeling_stil.presets import create_model

    torch.manual_seed(1)
    model = create_model(name, schema=schema, metadata=metadata, **overrides)
    model.save_pretrained(path)
    return model


def test_init_from_loads_shared_encoders_across_families_and_reports(tmp_path):
    from modeling_stil.presets import create_model
    from modeling_stil.pretrained_init import init_from_pretrained

    source = _save_model("tip-tiny", tmp_path / "src")  # TIP pretraining network -> STiL
    torch.manual_seed(2)
    target = create_model("stil-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from_pretrained(target, tmp_path / "src")
    assert report["loaded"] and all(k.startswith(("encoder_imaging.", "encoder_tabular.")) for k in report["loaded"])
    src = source.state_dict()
    for key in report["loaded"]:
        assert torch.equal(target.state_dict()[key], src[key]), key
    untouched = [k for k in before if k.startswith("classifier")]
    assert untouched and all(torch.equal(target.state_dict()[k], before[k]) for k in untouched)
    assert set(report["not_initialised"]) >= set(untouched)


def test_init_from_refuses_another_schema_or_class_count(tmp_path):
    from data_utils.io import DatasetMetadata
    from data_utils.schema import TabularField, TabularSchema
    from modeling_stil.presets import create_model
    from modeling_stil.pretrained_init import InitFromError, init_from_pretrained

    _save_model("stil-tiny", tmp_path / "src")
    other_schema = TabularSchema([TabularField("x", "continuous", mean=0.0, std=1.0)] + TOY_SCHEMA.fields[2:])
    with pytest.raises(InitFromError, match="another table schema"):
        init_from_pretrained(create_model("stil-tiny", schema=other_schema, metadata=TOY_METADATA), tmp_path / "src")
    four = DatasetMetadata(label_names=["a", "b", "c", "d"])
    with pytest.raises(InitFromError, match="classes"):
        init_from_pretrained(create_model("stil-tiny", schema=TOY_SCHEMA, metadata=four), tmp_path / "src")
    with pytest.raises(InitFromError, match="no such folder"):
        init_from_pretrained(create_model("stil-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA), tmp_path / "missing")


def test_init_from_through_the_cli_records_the_report(tmp_path, synthetic_cache):
    first = tmp_path / "first"
    assert run_train(base_argv(first, synthetic_cache, "--method", "supervised", "--model", "multimodal-tip-tiny")) == 0
    second = tmp_path / "second"
    assert run_train(base_argv(second, synthetic_cache, "--method", "supervised", "--model", "multimodal-tip-tiny",
                               "--init_from", str(first), "--max_steps", "1", "--eval_steps", "1")) == 0
    info = json.loads((second / "run_info.json").read_text())
    assert info["init_from"] == str(first)
    assert len(info["init_report"]["loaded"]) > 0


# ---------------------------------------------------------------------------- regression + schedule
def test_regression_targets_are_standardised_on_the_labelled_rows_and_reported_in_original_units(tmp_path, synthetic_cache):
    from data_utils.io import load_dataset

    out = tmp_path / "run"
    assert run_train(base_argv(out, synthetic_cache, "--method", "supervised", "--model", "tcdcnn", "--standardize_targets", "true",
                               "--labeled_view", "translate", task="landmarks")) == 0
    config = json.loads((out / "config.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    ds, meta, _ = load_dataset(info["dataset"])
    targets = np.asarray(ds["train"].select(info["labeled_indices"])[meta.label_column], dtype=np.float64)
    np.testing.assert_allclose(config["target_mean"], targets.mean(0), rtol=1e-5)
    np.testing.assert_allclose(config["target_std"], targets.std(0, ddof=1), rtol=1e-5)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["reload_check"]["matches"]
    assert 0 < results["test"]["nme"] < 10  # in original units (a standardised-space NME would be meaningless)


def test_standardize_targets_helper():
    from modeling_stil.training.batches import standardize_targets

    batch = {"labels": torch.tensor([[2.0, 4.0]]), "index": torch.tensor([0]), "v": {"labels": torch.tensor([[4.0, 4.0]])},
             "monitor_labels": torch.tensor([[0.0, 0.0]])}
    out = standardize_targets(batch, torch.tensor([2.0, 2.0]), torch.tensor([2.0, 1.0]))
    assert out["labels"].tolist() == [[0.0, 2.0]]
    assert out["v"]["labels"].tolist() == [[1.0, 2.0]]
    assert out["monitor_labels"].tolist() == [[-1.0, -2.0]]
    assert out["index"].tolist() == [0]


def test_multistep_schedule():
    from modeling_stil.training.optim import lr_lambda_factory

    f = lr_lambda_factory("multistep", 100, 0, "step", 10, milestones=[0.5, 80], gamma=0.1)
    assert [f(0), f(49), f(50), f(79)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert f(80) == pytest.approx(0.01)


def test_multistep_needs_milestones():
    from modeling_stil.training.arguments import parse_run_arguments
    from modeling_stil.training.recipe_reading import ArgumentError

    with pytest.raises(ArgumentError, match="lr_milestones"):
        parse_run_arguments(["--lr_scheduler", "multistep"])
    args = parse_run_arguments(["--lr_scheduler", "multistep", "--lr_milestones", "0.5,0.75"])
    assert args.training.lr_milestones == [0.5, 0.75]


# ----------------------------------------------------------------------------------------- python API
def test_fit_runs_the_train_py_path_from_python(tmp_path, synthetic_cache):
    from modeling_stil.training import fit

    with fresh_accelerate_state():
        results = fit({"method": "supervised", "model": "multimodal-concat-tiny"}, output_dir=str(tmp_path / "nb"),
                      dataset_cache_dir=str(synthetic_cache), synthetic_num_samples=300, labeled_fraction=0.2,
                      per_device_train_batch_size=4, max_steps=3, eval_steps=3, report_to="none", disable_tqdm=True)
    assert results["finished"] and results["reload_check"]["matches"]
    assert math.isfinite(results["test"]["accuracy"])


def test_the_model_follows_the_data_and_the_method(tmp_path, synthetic_cache):
    """No --model: image-only data gets an image preset (it used to stop with a tabular-schema error),
    STiL gets its own network, and a preset that does not fit names the ones that do."""
    out = tmp_path / "img"
    assert run_train(base_argv(out, synthetic_cache, "--method", "supervised", "--max_steps", "1", "--eval_steps", "1",
                               task="image")) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] != "stil"
    import yaml

    assert yaml.safe_load((out / "run_config.yaml").read_text())["model"] == "image-tiny"
    out = tmp_path / "stil"
    assert run_train(base_argv(out, synthetic_cache, "--method", "stil", "--max_steps", "1", "--eval_steps", "1")) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "stil"


def test_a_preset_that_does_not_fit_names_the_fitting_ones(tmp_path, synthetic_cache, capsys):
    code = run_train(base_argv(tmp_path / "x", synthetic_cache, "--method", "supervised", "--model", "multimodal-concat-tiny",
                               task="image"))
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and "--model image-tiny" in err[0]
