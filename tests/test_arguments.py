"""Recipe + command-line parsing, and the shipped recipes / accelerate configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modeling_stil.training.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_run_arguments,
)
from modeling_stil.training.recipe_reading import ArgumentError, load_recipe, parse_cli_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_no_arguments_is_the_default_job():
    run = parse_run_arguments([])
    assert run.training.method == "supervised"
    assert run.model.model is None  # the model follows the data and the method (multimodal-concat-tiny here)
    assert run.data.dataset is None and run.data.synthetic_task == "multimodal"
    assert type(run.method).__name__ == "SupervisedArguments"
    assert run.training.report_to == ["tensorboard"]


def test_default_recipe_equals_the_defaults():
    assert parse_run_arguments([str(ROOT / "recipes" / "default.yaml")]).to_dict() == parse_run_arguments([]).to_dict()


def test_cli_overrides_recipe_and_types_are_converted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: fixmatch\nlearning_rate: 0.03\nmax_steps: 50\nthreshold: 0.9\nmodel_overrides: {hidden: 3}\n")
    run = parse_run_arguments([str(recipe), "--learning_rate", "0.1", "--threshold=0.8", "--push_to_hub", "--hub_model_id", "me/x",
                               "--report_to", "tensorboard,none", "--max_grad_norm", "none", "--mixed_precision", "bf16"])
    assert run.training.method == "fixmatch" and type(run.method).__name__ == "FixMatchArguments"
    assert run.training.learning_rate == 0.1 and isinstance(run.training.learning_rate, float)
    assert run.training.max_steps == 50 and run.method.threshold == 0.8
    assert run.training.push_to_hub is True and run.training.max_grad_norm is None
    assert run.training.report_to == ["tensorboard", "none"] and run.training.mixed_precision == "bf16"
    assert run.model.model_overrides == {"hidden": 3}
    assert parse_run_arguments(["--report_to", "none"]).training.report_to == ["none"]


def test_method_from_cli_decides_the_second_pass(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: fixmatch\nthreshold: 0.9\n")
    # fixmatch keys in the recipe become unknown when the command line switches to supervised
    with pytest.raises(ArgumentError, match="threshold"):
        parse_run_arguments([str(recipe), "--method", "supervised"])


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ArgumentError) as error:
        parse_run_arguments(["--learning_rat", "0.1"])
    message = str(error.value)
    assert "learning_rat" in message and "did you mean learning_rate" in message
    assert "valid keys:" in message and "per_device_train_batch_size" in message and "labeled_view" in message


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--max_steps", "ten"], "expected an integer"),
        (["--optimizer", "lamb"], "not one of"),
        (["--nesterov", "maybe"], "boolean"),
        (["--push_to_hub"], "hub_model_id"),
        (["--labeled_fraction", "1.5"], "labeled_fraction"),
        (["--method", "nomethod"], "unknown method"),
        (["--mu", "0"], "mu must be"),
    ],
)
def test_bad_values_fail_clearly(argv, fragment):
    with pytest.raises(ArgumentError, match=fragment):
        parse_run_arguments(argv)


def test_method_argument_validation_surfaces():
    with pytest.raises(ArgumentError, match="threshold"):
        parse_run_arguments(["--method", "fixmatch", "--threshold", "2"])


def test_cli_token_parsing():
    recipe, values = parse_cli_overrides(["r.yaml", "--a", "1", "--b-c=2", "--flag", "--d", "x"])
    assert recipe == "r.yaml" and values == {"a": "1", "b_c": "2", "flag": True, "d": "x"}
    with pytest.raises(ArgumentError, match="twice"):
        parse_cli_overrides(["--a", "1", "--a", "2"])
    with pytest.raises(ArgumentError, match="unexpected argument"):
        parse_cli_overrides(["r.yaml", "other.yaml"])


def test_resolved_config_round_trips(tmp_path):
    run = parse_run_arguments(["--method", "fixmatch", "--seed", "7", "--threshold", "0.7"])
    path = run.save_yaml(tmp_path / "run_config.yaml")
    again = parse_run_arguments([str(path)])
    assert again.to_dict() == run.to_dict()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    run = parse_run_arguments([str(recipe)])
    assert run.training.method == load_recipe(recipe).get("method", "supervised")


def test_recipes_cover_the_issue():
    names = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert {"default.yaml", "fixmatch_synthetic_image.yaml", "fixmatch_synthetic_multimodal.yaml"} <= names


CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_every_launch_setting_has_configs():
    names = {p.stem for p in CONFIGS}
    assert "cpu" in names
    for base in ("single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2"):
        assert {base, f"{base}_bf16", f"{base}_fp16"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    expected = {"_bf16": "bf16", "_fp16": "fp16"}.get(path.stem[-5:], "no")
    assert str(config.mixed_precision) == expected
    kind = str(config.distributed_type).split(".")[-1]
    want = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU", "fsdp": "FSDP",
            "fsdp_cpu": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    base = path.stem.replace("_bf16", "").replace("_fp16", "")
    assert kind == want[base]
    if base in ("cpu", "fsdp_cpu"):
        assert config.use_cpu is True
    if base == "multi_node":
        assert config.num_machines > 1 and config.main_process_ip
    if base == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
    if base in ("fsdp", "fsdp_cpu"):
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_version"] == 2  # the only FSDP that runs on the CPU (and the one tested there)


def test_every_field_has_help():
    for cls in (DataArguments, ModelArguments, TrainingArguments):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_every_recipe_parses_and_names_a_real_method_and_model():
    from modeling_stil.presets import list_presets

    presets = set(list_presets())
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        run = parse_run_arguments([str(recipe)])
        assert run.model.model is None or run.model.model in presets, recipe.name
        if run.model.init_from:  # STiL and the STiL repository's baselines start from the TIP run their recipe names
            assert run.training.method != "tip_pretrain" and "tip" in Path(run.model.init_from).name, recipe.name
    names = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    for dataset in ("dvm_1pct", "dvm_10pct", "ukbb_cad_1pct", "ukbb_cad_10pct", "ukbb_infarction_1pct", "ukbb_infarction_10pct"):
        assert f"stil_{dataset}" in names
    assert {"tip_dvm", "tip_ukbb", "tip_synthetic", "stil_synthetic"} <= names


def test_the_hub_token_never_reaches_run_config(tmp_path):
    run = parse_run_arguments(["--hub_token", "hf_secret123", "--push_to_hub", "--hub_model_id", "me/x"])
    path = run.save_yaml(tmp_path / "run_config.yaml")
    assert "hf_secret123" not in path.read_text()
    assert parse_run_arguments([str(path)]).training.hub_token is None


def test_recipe_extends_applies_parents_then_own_values(tmp_path):
    (tmp_path / "base.yaml").write_text("method: fixmatch\nlearning_rate: 0.1\nmu: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\nlearning_rate: 0.01\ntraining: {seed: 7}\n")
    assert load_recipe(tmp_path / "sub" / "child.yaml") == {"method": "fixmatch", "learning_rate": 0.01, "mu": 3, "seed": 7}
    run = parse_run_arguments([str(tmp_path / "sub" / "child.yaml")])
    assert run.training.learning_rate == 0.01 and run.data.mu == 3 and run.training.method == "fixmatch"


def test_recipe_extends_errors_name_the_problem(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ArgumentError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ArgumentError, match="missing.yaml"):
        load_recipe(tmp_path / "c.yaml")


@pytest.mark.parametrize("recipe", ["fixmatch_synthetic_image.yaml", "freematch_synthetic_image.yaml"])
def test_short_image_match_recipes_optimise_as_their_supervised_baseline(recipe):
    """The suite compares them with supervised_synthetic_image.yaml: same optimiser, learning rate and
    gradient clipping (unclipped at SGD 0.03 this tiny network collapsed on some seeds;
    docs/results_analysis.md), so the comparison measures the unlabelled term, not the optimiser."""
    ours = parse_run_arguments([str(ROOT / "recipes" / recipe)]).training
    supervised = parse_run_arguments([str(ROOT / "recipes" / "supervised_synthetic_image.yaml")]).training
    for key in ("optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "lr_scheduler", "max_grad_norm"):
        assert getattr(ours, key) == getattr(supervised, key), key
    assert supervised.max_grad_norm == 1.0
