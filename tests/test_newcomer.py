"""A new user's first session (issue: fresh clone, synthetic multimodal data, fixmatch, a few steps):
help, one-line errors, overwrite_output_dir, refused and changed resumes, moved datasets, predict.py's
bad rows, the NaN guard's good checkpoint, the model card and Hugging Face conventions."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from tests._helpers import (
    load_script,
    one_error_line,
    tiny_fixmatch_argv,
)
from tests._helpers import train_captured as train

argv = tiny_fixmatch_argv


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("newcomer_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """A finished 4-step fixmatch run (checkpoints at 2 and 4, export)."""
    out = tmp_path_factory.mktemp("newcomer") / "run"
    code, _, err = train(argv(out, cache))
    assert code == 0, err[-3000:]
    return out


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------- item 7
def test_help_goes_to_stdout_with_choices_and_the_method_arguments():
    code, out, err = train(["--method", "fixmatch", "--help"])
    assert code == 0 and err == ""
    assert "--optimizer {adamw,adam,sgd}" in out and "--mixed_precision {no,fp16,bf16} or None" in out
    assert "training arguments:" in out and "data arguments:" in out
    assert "method arguments (fixmatch):" in out and "--threshold" in out
    code, out, _ = train(["-h"])
    assert code == 0 and "--method fixmatch --help" in out and "fixmatch" in out


# ------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("extra, expected", [
    (("--model", "image-tny"), "unknown model 'image-tny'"),
    (("--model", "tip-tiny", "--method", "supervised"), "without a prediction head"),
    (("--model", "stil-tiny", "--method", "supervised", "--synthetic_task", "image"), "image-only"),
])
def test_model_mistakes_are_one_line_before_any_file(tmp_path, cache, extra, expected):
    out = tmp_path / "run"
    line = one_error_line(*train(argv(out, cache, *extra))[::2])
    assert expected in line
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def _copy_synthetic(cache: Path, target: Path) -> Path:
    """A copy of the synthetic dataset the tiny runs use (built into the cache when absent)."""
    from data_utils.synthetic import make_synthetic_dataset

    source = cache / "synthetic-multimodal-n300-s32-l0.2"
    if not source.exists():
        make_synthetic_dataset("multimodal", source, num_samples=300, image_size=32, labeled_fraction=0.2)
    shutil.copytree(source, target)
    return target


def test_undecodable_image_is_named_before_training_or_skipped(tmp_path, cache):
    import datasets

    from data_utils.io import load_dataset

    data = _copy_synthetic(cache, tmp_path / "ds")
    dd, metadata, schema = load_dataset(data)
    train_split = dd["train"].cast_column("image", datasets.Image(decode=False))
    rows = train_split.to_list()
    rows[7]["image"] = {"bytes": b"not a png", "path": None}
    features = train_split.features
    broken = datasets.Dataset.from_list(rows, features=features).cast_column("image", datasets.Image())
    dd["train"] = broken
    from data_utils.io import save_dataset

    bad = tmp_path / "bad"
    save_dataset(dd, bad, metadata, schema)
    line = one_error_line(*train(argv(tmp_path / "r1", cache, "--dataset", str(bad)))[::2])
    assert "train row 7" in line and "--bad_images skip" in line
    assert not (tmp_path / "r1").exists()
    code, out, err = train(argv(tmp_path / "r2", cache, "--dataset", str(bad), "--bad_images", "skip", "--max_steps", "2"))
    assert code == 0, err[-3000:]
    assert "dropped 1 row(s)" in out + err and "train row 7" in out + err


def test_damaged_dataset_file_names_the_file_and_the_fix(tmp_path, cache):
    data = _copy_synthetic(cache, tmp_path / "ds")
    arrow = next((data / "validation").glob("*.arrow"))
    arrow.write_bytes(b"\x00" * 64 + arrow.read_bytes()[64:200])
    line = one_error_line(*train(argv(tmp_path / "r", cache, "--dataset", str(data)))[::2])
    assert "validation/" in line and arrow.name in line and "rebuild" in line


# ------------------------------------------------------------------------------------------- item 0
def test_overwrite_removes_only_run_files_and_refuses_with_foreign_files(tmp_path, cache):
    out = tmp_path / "run"
    assert train(argv(out, cache, "--max_steps", "2", "--export", "false"))[0] == 0
    (out / "notes.txt").write_text("mine")
    line = one_error_line(*train(argv(out, cache, "--max_steps", "2", "--overwrite_output_dir", "true"))[::2])
    assert "notes.txt" in line and "--allow_foreign_files" in line
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # nothing removed on refusal
    code, _, err = train(argv(out, cache, "--max_steps", "2", "--overwrite_output_dir", "true", "--allow_foreign_files", "true"))
    assert code == 0, err[-3000:]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "checkpoint-2").is_dir() and (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------- items 2, 4, 10
def test_refused_resume_writes_nothing(finished_run, cache):
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, cache, "--synthetic_num_samples", "360", "--resume_from_checkpoint", "latest"))
    line = one_error_line(code, err)
    assert "cannot resume" in line or "cannot resume" in err
    assert snapshot(finished_run) == before


def test_resume_mismatch_is_reported_before_a_config_error(finished_run, cache, tmp_path):
    # another (smaller) dataset whose labelled rows are fewer than the batch: the resume mismatch comes first
    from data_utils.synthetic import make_synthetic_dataset

    small = tmp_path / "small"
    make_synthetic_dataset("multimodal", small, num_samples=200, image_size=32, labeled_fraction=0.05)
    code, _, err = train(argv(tmp_path / "x", cache, "--dataset", str(small), "--per_device_train_batch_size", "32"))
    assert code == 1 and "cannot resume" not in err  # on its own: the config error
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, cache, "--dataset", str(small), "--per_device_train_batch_size", "32",
                              "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "cannot resume" in err and "other content" in err
    assert snapshot(finished_run) == before


def test_changed_hyperparameters_on_resume_are_refused_and_recorded_config_is_what_ran(finished_run, cache):
    before = snapshot(finished_run)
    code, _, err = train(argv(finished_run, cache, "--learning_rate", "0.5", "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "learning_rate: 0.01 -> 0.5" in err and "--init_from" in err
    code, _, err = train(argv(finished_run, cache, "--max_steps", "8", "--resume_from_checkpoint", "latest"))
    one_error_line(code, err)
    assert "max_steps: 4 -> 8" in err and f"--init_from {finished_run}" in err and "learning rate 0" in err
    assert snapshot(finished_run) == before
    assert yaml.safe_load((finished_run / "run_config.yaml").read_text())["learning_rate"] == 0.01


def test_applied_setting_on_resume_is_warned_and_recorded(tmp_path, cache):
    out = tmp_path / "run"
    assert train(argv(out, cache, "--stop_after_steps", "2", "--export", "false"))[0] == 0
    code, stdout, err = train(argv(out, cache, "--eval_steps", "1", "--export", "false", "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]
    assert "eval_steps: 2 -> 1" in stdout + err
    info = json.loads((out / "run_info.json").read_text())
    assert info["changed_on_resume"] == {"eval_steps": [2, 1], "stop_after_steps": [2, None]}
    assert yaml.safe_load((out / "run_config.yaml").read_text())["eval_steps"] == 1


# ------------------------------------------------------------------------------------------- item 3
def test_moved_dataset_resumes(tmp_path, cache):
    data = _copy_synthetic(cache, tmp_path / "a" / "ds")
    out = tmp_path / "run"
    assert train(argv(out, cache, "--dataset", str(data), "--stop_after_steps", "2", "--export", "false"))[0] == 0
    moved = tmp_path / "b" / "ds_moved"
    moved.parent.mkdir()
    shutil.move(str(data), str(moved))
    code, _, err = train(argv(out, cache, "--dataset", str(moved), "--export", "false", "--resume_from_checkpoint", "latest"))
    assert code == 0, err[-3000:]


# ------------------------------------------------------------------------------------------- item 1
@pytest.fixture(scope="module")
def saved_toy_model(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image

    from modeling_stil.presets import create_model
    from modeling_stil.processing_stil import StilProcessor
    from tests._helpers import TOY_METADATA, TOY_SCHEMA

    folder = tmp_path_factory.mktemp("toy_model")
    torch.manual_seed(0)
    model = create_model("multimodal-concat-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA).eval()
    model.save_pretrained(folder)
    StilProcessor.from_model_config(model.config).save_pretrained(folder)
    images = folder / "imgs"
    images.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    return folder, images


def test_predict_reports_each_bad_row_and_predicts_the_others(tmp_path, saved_toy_model):
    import csv

    folder, images = saved_toy_model
    table = tmp_path / "rows.csv"
    rows = [
        {"image": "a.png", "color": "blue", "make": "d", "age": "3.5", "km": "", "price": "12"},   # good
        {"image": "gone.png", "color": "red", "make": "a", "age": "1", "km": "2", "price": "3"},   # missing file
        {"image": "b.png", "color": "purple", "make": "a", "age": "9", "km": "80", "price": "7"},  # unseen category
        {"image": "b.png", "color": "red", "make": "b", "age": "old", "km": "80", "price": "7"},  # non-numeric
        {"image": "broken.png", "color": "red", "make": "b", "age": "2", "km": "80", "price": "7"},  # unreadable
        {"image": "b.png", "color": "", "make": "c", "age": "2", "km": "80", "price": "7"},       # good (missing cell)
    ]
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    predict = load_script("predict")
    out, err = io.StringIO(), io.StringIO()
    output = tmp_path / "out.jsonl"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict.main(["--model", str(folder), "--table", str(table), "--images-root", str(images), "--output", str(output)])
    assert code == 1
    records = {r["row"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert sorted(records) == list(range(6))
    assert "predictions" in records[0] and "predictions" in records[5]
    assert records[1]["error"]["column"] == "image" and "not found" in records[1]["error"]["reason"]
    assert records[2]["error"]["column"] == "color" and "unseen category 'purple'" in records[2]["error"]["reason"]
    assert records[3]["error"]["column"] == "age" and "non-numeric" in records[3]["error"]["reason"]
    assert records[4]["error"]["column"] == "image" and "cannot read" in records[4]["error"]["reason"]
    assert "row 3: error: column 'age'" in out.getvalue()
    assert "predicted 2 of 6 rows; 4 failed (rows 1, 2, 3, 4)" in err.getvalue()
    # an unseen category treated as missing: that row is predicted, with a warning
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = predict.main(["--model", str(folder), "--table", str(table), "--images-root", str(images),
                             "--output", str(output), "--unknown-category", "missing"])
    records = {r["row"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert code == 1 and "predictions" in records[2] and "treated as missing" in records[2]["warnings"][0]
    good = tmp_path / "good.csv"
    good.write_text(table.read_text().splitlines()[0] + "\n" + table.read_text().splitlines()[1] + "\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert predict.main(["--model", str(folder), "--table", str(good), "--images-root", str(images)]) == 0


# ------------------------------------------------------------------------------------------- item 8
def test_nan_guard_does_not_name_a_checkpoint_whose_weights_already_exploded(tmp_path, cache):
    out = tmp_path / "run"
    code, _, err = train(argv(out, cache, "--learning_rate", "1e9", "--save_steps", "1", "--logging_steps", "1",
                              "--max_steps", "6"))
    line = one_error_line(code, err)
    assert "non-finite loss" in line
    good = line.split("last good checkpoint:", 1)[1]
    assert not good.strip().startswith(str(out / "checkpoints" / "checkpoint-1")), line
    assert "after checkpoint-1" in line and "lower --learning_rate (now 1e+09" in line


# ------------------------------------------------------------------------------------------- item 10
def test_save_total_limit_counts_the_best_when_it_is_among_the_newest(tmp_path):
    from modeling_stil.training import checkpointing as ckpt
    from tests.test_trainer import make_trainer

    trainer = make_trainer(tmp_path, max_steps=12, eval_steps=2, save_total_limit=2, metric_for_best_model="last")
    trainer.train()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-10", "checkpoint-12"]


def test_metrics_jsonl_writes_null_for_nan_and_plots_show_masked_accuracy_and_total_loss(tmp_path, monkeypatch):
    import math

    from modeling_stil.training import plots
    from modeling_stil.training.tracking import JsonlLogger

    log = JsonlLogger(tmp_path / "m.jsonl")
    for step, masked in ((1, math.nan), (2, 0.5), (3, 0.75)):
        log.log({"step": step, "split": "train", "loss": 1.0 / step, "sup_loss": 1.0 / step, "mask_ratio": 0.1 * step,
                 "pseudo_label_accuracy": 0.4, "pseudo_label_accuracy_masked": masked})
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert first["pseudo_label_accuracy_masked"] is None and '"nan"' not in (tmp_path / "m.jsonl").read_text()
    figures = {}
    original = plots._save

    def capture(plt, fig, path):
        fig.canvas.draw()
        figures[path.name] = fig
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = ax.title.get_window_extent(renderer)
        box = fig.bbox
        assert title.x0 >= box.x0 - 1 and title.x1 <= box.x1 + 1, f"{path.name}: title cut off"
        return original(plt, fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    plots.write_plots(log.history(), tmp_path / "plots", title="fixmatch")
    labels = [line.get_label() for line in figures["pseudo_labels.png"].axes[0].get_lines()]
    assert any("kept rows" in label for label in labels)
    lines = {line.get_label(): line for line in figures["losses.png"].axes[0].get_lines()}
    total, term = lines["loss (total)"], lines["sup_loss"]
    assert total.get_linewidth() > term.get_linewidth() and total.get_alpha() < 1  # visible around an equal term


# ------------------------------------------------------------------------------------------- items 5, 9
def test_card_after_push_names_the_repo_and_its_snippet_predicts_from_raw_inputs(tmp_path, cache, monkeypatch):
    import re

    import huggingface_hub
    import numpy as np
    from huggingface_hub import ModelCard
    from PIL import Image

    # a dataset whose raw table named its image column "path" (what prepare_dataset.py records)
    data = _copy_synthetic(cache, tmp_path / "cars")
    meta_file = data / "stil_dataset.json"
    meta = json.loads(meta_file.read_text())
    meta["source"] = {**(meta.get("source") or {}), "image_column": "path"}
    meta_file.write_text(json.dumps(meta))
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def create_commit(self, *, repo_id, operations, **kwargs):
            card = next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md")
            sent["card"] = card.decode() if isinstance(card, bytes) else Path(card).read_text()
            return "https://huggingface.co/someone/cars/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "run"
    code, _, err = train(argv(out, cache, "--dataset", str(data), "--max_steps", "2", "--push_to_hub", "true",
                              "--hub_model_id", "someone/cars", "--hub_token", "secret-token"))
    assert code == 0, err[-3000:]
    card = ModelCard(sent["card"])
    data_ = card.data.to_dict()
    assert "pipeline_tag" not in data_ and "datasets" not in data_  # no failing pipeline, no local folder as a dataset
    assert str(out) not in card.text and str(tmp_path) not in card.text
    assert 'from_pretrained("someone/cars", trust_remote_code=True)' in card.text
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card.text, re.S).group(1))
    assert not any(k.startswith("synthetic_") for k in recipe) and "hub_token" not in recipe and "report_to" not in recipe
    assert recipe["method"] == "fixmatch" and recipe["max_steps"] == 2
    assert "secret-token" not in card.text
    # the processor remembers the raw table's image column
    assert json.loads((out / "processor_config.json").read_text())["image_column"] == "path"
    # the snippet runs from raw inputs (an image file and a raw row) against the exported folder
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1).replace('"someone/cars"', f'"{out}"')
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "example.jpg")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "card-snippet", "exec"), {})
    assert "'label'" in printed.getvalue()


def test_synthetic_dataset_folder_is_shared_like_a_mkdir(tmp_path):
    import os

    from data_utils.permissions import current_umask
    from data_utils.synthetic import make_synthetic_dataset

    old = os.umask(0o002)
    try:
        path = make_synthetic_dataset("image", tmp_path / "ds", num_samples=200, image_size=16)
        assert stat.S_IMODE(path.stat().st_mode) == 0o775 == 0o777 & ~current_umask()
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o775 for p in path.rglob("*") if p.is_dir())
    finally:
        os.umask(old)


def test_resize_is_said_once(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from data_utils import loaders

    monkey = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(monkey, format="PNG")
    loaders._RESIZE_NOTICE_GIVEN = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loaders.decode_image({"bytes": monkey.getvalue(), "path": None}, 3, 16)
    notices = [w for w in caught if "resized" in str(w.message)]
    assert len(notices) == 1 and "20x20" in str(notices[0].message) and "16x16" in str(notices[0].message)
