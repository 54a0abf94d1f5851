"""A newcomer's dirty data (issue 19, items 3-6, 8-12, 17): 16-bit images, vocabularies compared by value,
image-only methods on image+tabular data, a recipe's labeled_fraction against a dataset's own labels,
table row numbers in build messages, one-line errors of predict/evaluate, landmark views for every
method, one error line from two processes, and a switch for horizontal flips."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_utils.builders._common import run_cli
from data_utils.io import DatasetMetadata, load_dataset, save_dataset
from data_utils.schema import TabularField, TabularSchema
from tests._helpers import ROOT, TOY_METADATA, TOY_SCHEMA, load_script, run_train

prepare_dataset = load_script("prepare_dataset")
evaluate_script = load_script("evaluate_model")
predict_script = load_script("predict")


def make_table(folder: Path, n: int = 24, image=None) -> Path:
    """n rows (3 classes), images img/{i}.png (16 px RGB unless ``image(i)`` gives the PIL image)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        picture = image(i) if image else Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        picture.save(folder / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "model": "abc"[i % 3], "color": ["red", "blue", "green"][i % 3],
                     "length": 4000.0 + 10 * i})
    path = folder / "table.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


BASE = ["--image-column", "path", "--label-column", "model", "--categorical", "color", "--continuous", "length",
        "--no-progress", "--seed", "0"]


def build(table: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_cli(prepare_dataset.main, [*map(str, ["--table", table, *BASE, "--output", out]), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def sixteen_bit(i: int) -> Image.Image:
    """A 16-bit grayscale ramp over 134..65496 (mean ~33000): 8-bit clipping would make it white."""
    return Image.fromarray(np.linspace(134, 65496, 16 * 16).reshape(16, 16).astype(np.uint16))


# ------------------------------------------------------------------------------------------- item 3
def test_16_bit_images_are_scaled_not_clipped_and_the_build_says_so_once(tmp_path):
    table = make_table(tmp_path, image=sixteen_bit)
    code, out, err = build(table, tmp_path / "ds")
    assert code == 0, err
    notes = [line for line in out.splitlines() if "16-bit" in line]
    assert len(notes) == 1 and "24 16-bit image(s)" in notes[0] and "257" in notes[0], out
    dd, _, _ = load_dataset(tmp_path / "ds")
    pixels = np.asarray(dd["train"][0]["image"].convert("L"), dtype=np.float64)
    expected = np.rint(np.asarray(sixteen_bit(0), dtype=np.float64) / 257)
    np.testing.assert_array_equal(pixels, expected)  # was 99.7 % at 255
    assert (pixels == 255).mean() < 0.01


def test_16_bit_images_are_scaled_in_the_loaders_and_in_predict(tmp_path):
    from data_utils.loaders import decode_image
    from modeling_stil.processing_stil import StilProcessor

    picture = sixteen_bit(0)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    with pytest.warns(UserWarning, match="16-bit images are scaled"):
        tensor, _ = decode_image({"bytes": buffer.getvalue(), "path": None}, num_channels=1, size=None)
    assert abs(tensor.float().mean().item() - 33001 / 257) < 1
    processor = StilProcessor(image_size=16, num_channels=3)
    with pytest.warns(UserWarning, match="16-bit images are scaled"):
        chw = processor._to_uint8_chw(picture)
    assert abs(chw.float().mean().item() - 33001 / 257) < 1


def test_float_images_are_refused_with_the_row_and_the_file(tmp_path):
    table = make_table(tmp_path, image=sixteen_bit)
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "img" / "7.tiff")
    df = pd.read_csv(table)
    df.loc[7, "path"] = "img/7.tiff"
    df.to_csv(table, index=False)
    code, _, err = build(table, tmp_path / "ds")
    assert code == 2 and "row 7" in err and "7.tiff" in err and "float" in err, err


# ------------------------------------------------------------------------------------------- item 8
def test_build_messages_use_the_table_row_and_the_file_path(tmp_path):
    table = make_table(tmp_path)
    data = (tmp_path / "img" / "7.png").read_bytes()
    (tmp_path / "img" / "7.png").write_bytes(data[: len(data) // 2])  # truncated
    code, _, err = build(table, tmp_path / "ds")
    assert code == 2, err
    assert "row 7" in err and str(tmp_path / "img" / "7.png") in err and "train row" not in err, err

    table = make_table(tmp_path / "b")
    (tmp_path / "b" / "img" / "9.png").write_text("name,value\nnot,an image\n")
    code, _, err = build(table, tmp_path / "b" / "ds")
    assert code == 2, err
    assert "row 9" in err and "9.png" in err and "not an image file" in err, err
    assert "BytesIO" not in err and "0x" not in err, err


# ------------------------------------------------------------------------------------------- item 17
def test_a_raw_csv_folder_as_dataset_reads_well_and_points_at_prepare_dataset(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert "the folder holds table.csv" in message and "is holds" not in message
    assert "prepare_dataset.py --table" in message


def _transforms(view) -> list:
    found = []

    def walk(t):
        found.append(t)
        for child in getattr(t, "transforms", []) or []:
            walk(child)

    if view.transform is not None:
        walk(view.transform)
    return found


@pytest.mark.parametrize("preset", ["default", "dvm", "cardiac", "cifar"])
def test_hflip_false_removes_the_flip_from_every_view_of_every_preset(preset):
    from torchvision.transforms import v2

    from data_utils.views import ViewConfig, build_image_view

    for size in (32, 96):
        for name in ("weak", "strong", "stil", "stil_always", "hard"):
            flips = lambda cfg: [t for t in _transforms(build_image_view(name, cfg))  # noqa: E731
                                 if isinstance(t, v2.RandomHorizontalFlip)]
            assert flips(ViewConfig(image_size=size, preset=preset)), (preset, name)
            assert not flips(ViewConfig(image_size=size, preset=preset, hflip=False)), (preset, name)


def test_hflip_is_a_recipe_key_that_reaches_the_training_views(tmp_path, synthetic_cache, monkeypatch):
    from modeling_stil.training import job
    from modeling_stil.training.arguments import parse_run_arguments

    assert parse_run_arguments(["--hflip", "false"]).data.hflip is False
    assert parse_run_arguments([]).data.hflip is True
    seen = {}
    real = job.build_loaders

    def spy(args, method, model_config, dataset_dict, metadata, schema, accelerator):
        import data_utils.loaders as loaders

        original = loaders.build_train_loaders

        def capture(*a, **k):
            seen["hflip"] = k["view_config"].hflip
            raise SystemExit(0)

        monkeypatch.setattr(loaders, "build_train_loaders", capture)
        try:
            return real(args, method, model_config, dataset_dict, metadata, schema, accelerator)
        finally:
            monkeypatch.setattr(loaders, "build_train_loaders", original)

    monkeypatch.setattr(job, "build_loaders", spy)
    with pytest.raises(SystemExit):
        run_train(["--output_dir", str(tmp_path / "run"), "--dataset_cache_dir", str(synthetic_cache),
                   "--synthetic_num_samples", "200", "--report_to", "none", "--hflip", "false", "--model", "tabular-tiny"])
    assert seen == {"hflip": False}


# ------------------------------------------------------------------------------------------- item 9
def test_predict_with_a_missing_table_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        predict_script.main(["--model", str(tmp_path), "--table", "/nonexistent.csv"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0] and "/nonexistent.csv" in err[0], err


# ------------------------------------------------------------------------------------------- item 10
def test_evaluate_with_a_missing_model_folder_or_an_offline_hub_id(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    dataset = tmp_path / "ds"
    import datasets

    save_dataset(datasets.DatasetDict({s: datasets.Dataset.from_dict({"label": [0, 1]}) for s in ("train", "validation", "test")}),
                 dataset, DatasetMetadata(image_column=None, label_names=["a", "b"]))
    capsys.readouterr()
    for missing in (tmp_path / "no" / "such" / "run", "./runs/missing-run"):
        assert evaluate_script.main(["--model", str(missing), "--dataset", str(dataset)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no such folder" in err[0] and "Repo id" not in err[0], err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert evaluate_script.main(["--model", "someone/some-model", "--dataset", str(dataset)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline" in err[0], err


# ------------------------------------------------------------------------------------------- item 4
RENAMED = TabularSchema([
    TabularField("color", "categorical", ["crimson", "blue", "green"]),  # 'red' renamed, same size
    *TOY_SCHEMA.fields[1:],
])


def test_evaluate_refuses_a_vocabulary_that_differs_by_value(tmp_path, capsys):
    from modeling_stil.presets import create_model

    model = create_model("tabular-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA)
    model.save_pretrained(tmp_path / "model")
    import datasets

    rows = {f.name: [0, 1] for f in TOY_SCHEMA.categorical_fields}
    rows.update({f.name: [1.0, 2.0] for f in TOY_SCHEMA.continuous_fields})
    rows["label"] = [0, 1]
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "validation", "test")})
    metadata = DatasetMetadata(image_column=None, label_names=list(TOY_METADATA.label_names))
    save_dataset(dd, tmp_path / "same", metadata, schema=TOY_SCHEMA)
    save_dataset(dd, tmp_path / "renamed", metadata, schema=RENAMED)

    assert evaluate_script.main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "same")]) == 0
    capsys.readouterr()
    assert evaluate_script.main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "renamed")]) == 1
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if "'color'" in l)
    assert "'red'" in line and "'crimson'" in line and "prepare_dataset.py --schema" in line, err


def test_init_from_refuses_a_vocabulary_that_differs_by_value(tmp_path):
    from modeling_stil.presets import create_model
    from modeling_stil.pretrained_init import InitFromError, init_from_pretrained

    create_model("tabular-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA).save_pretrained(tmp_path / "pre")
    with pytest.raises(InitFromError, match=r"'color'.*'red'.*'crimson'|'color'.*'crimson'.*'red'"):
        init_from_pretrained(create_model("tabular-tiny", schema=RENAMED, metadata=TOY_METADATA), tmp_path / "pre")
    reordered = DatasetMetadata(label_names=["dog", "cat", "bird"])
    with pytest.raises(InitFromError, match="classes"):
        init_from_pretrained(create_model("tabular-tiny", schema=TOY_SCHEMA, metadata=reordered), tmp_path / "pre")
    init_from_pretrained(create_model("tabular-tiny", schema=TOY_SCHEMA, metadata=TOY_METADATA), tmp_path / "pre")


def test_a_refused_resume_names_the_column_whose_vocabulary_changed(tmp_path, capsys):
    make_table(tmp_path, n=30)
    code, _, err = build(tmp_path / "table.csv", tmp_path / "ds", "--val-fraction", "0.2", "--test-fraction", "0.2")
    assert code == 0, err
    argv = ["--dataset", str(tmp_path / "ds"), "--output_dir", str(tmp_path / "run"), "--model", "tabular-tiny",
            "--max_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none",
            "--disable_tqdm", "true", "--export", "false", "--plots", "false"]
    assert run_train(argv + ["--stop_after_steps", "1"]) == 0
    df = pd.read_csv(tmp_path / "table.csv")
    df["color"] = df["color"].replace({"red": "crimson"})  # the same size, other values
    df.to_csv(tmp_path / "table.csv", index=False)
    code, _, err = build(tmp_path / "table.csv", tmp_path / "ds", "--val-fraction", "0.2", "--test-fraction", "0.2",
                         "--overwrite")
    assert code == 0, err
    capsys.readouterr()
    assert run_train(argv + ["--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err
    assert "'color'" in err and "'red'" in err and "'crimson'" in err and "Traceback" not in err, err


def test_resume_names_the_column_whose_vocabulary_changed(tmp_path):
    from modeling_stil.training.resume import changed_vocabularies

    RENAMED.save(tmp_path)
    description = {"vocabularies": {f.name: f.categories for f in TOY_SCHEMA.categorical_fields}}
    lines = changed_vocabularies(str(tmp_path), description)
    assert len(lines) == 1 and "'color'" in lines[0] and "'red'" in lines[0] and "'crimson'" in lines[0]
    TOY_SCHEMA.save(tmp_path)
    assert changed_vocabularies(str(tmp_path), description) == []


# ------------------------------------------------------------------------------------------- item 5
def _args(*argv):
    from modeling_stil.training.arguments import parse_run_arguments

    return parse_run_arguments(list(argv))


MM_METADATA = DatasetMetadata(label_names=["cat", "dog", "bird"])


@pytest.mark.parametrize("method", ["simmatch", "freematch", "comatch"])
def test_image_only_methods_say_which_model_and_which_columns_it_ignores(method):
    from modeling_stil.methods.base import get_method_class
    from modeling_stil.training.model_setup import build_model

    said = []
    args = _args("--method", method)
    model = build_model(args, TOY_SCHEMA, MM_METADATA, get_method_class(method), say=said.append)
    assert set(model.input_modalities) == {"image"}
    assert len(said) == 1 and "image-tiny" in said[0] and "color, make, age, km, price" in said[0], said
    assert f"multimodal_{method}" in said[0]


@pytest.mark.parametrize("method", ["simmatch", "comatch"])
def test_image_only_methods_refuse_a_named_multimodal_model(method):
    from modeling_stil.methods.base import get_method_class
    from modeling_stil.training.model_setup import JobError, build_model

    with pytest.raises(JobError) as info:
        build_model(_args("--method", method, "--model", "multimodal-concat-tiny"), TOY_SCHEMA, MM_METADATA,
                    get_method_class(method), say=lambda _: None)
    message = str(info.value)
    assert "\n" not in message and "multimodal-concat-tiny" in message and f"--method multimodal_{method}" in message


def test_a_model_that_reads_the_table_says_nothing():
    from modeling_stil.methods.base import get_method_class
    from modeling_stil.training.model_setup import build_model

    said = []
    build_model(_args("--method", "fixmatch"), TOY_SCHEMA, MM_METADATA, get_method_class("fixmatch"), say=said.append)
    assert said == []


# ------------------------------------------------------------------------------------------- item 6
@pytest.fixture
def own_split():
    """A dataset of 300 train rows, 70 of them labelled by the dataset itself."""
    import datasets

    labels = [i % 3 for i in range(300)]
    labeled = [i < 70 for i in range(300)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"label": labels, "labeled": labeled})})
    return dd, DatasetMetadata(image_column=None, label_names=["cat", "dog", "fox"])


def test_a_recipe_fraction_does_not_redraw_a_datasets_own_labels(own_split, tmp_path):
    from modeling_stil.training.data_setup import labeled_split

    dd, meta = own_split
    recipe = str(ROOT / "recipes" / "fixmatch_synthetic_multimodal.yaml")  # labeled_fraction: 0.1
    args = _args(recipe, "--dataset", "mine")
    indices, how = labeled_split(args, dd, meta)
    assert indices == list(range(70))
    assert how.startswith("dataset's own split") and "--labeled_fraction 0.1" in how
    # run_config.yaml records what ran: training from it again keeps the dataset's own labels too
    assert args.data.labeled_fraction is None
    args.save_yaml(tmp_path / "run_config.yaml")
    assert labeled_split(_args(str(tmp_path / "run_config.yaml")), dd, meta)[0] == list(range(70))
    indices, how = labeled_split(_args(recipe, "--dataset", "mine", "--labeled_fraction", "0.5"), dd, meta)
    assert len(indices) == 150 and how.startswith("re-drawn: labeled_fraction 0.5")


def test_a_recipe_that_names_its_dataset_keeps_its_protocol(own_split, tmp_path):
    from modeling_stil.training.data_setup import labeled_split

    dd, meta = own_split
    recipe = tmp_path / "protocol.yaml"
    recipe.write_text("dataset: datasets/mine\nlabeled_fraction: 0.5\n")
    indices, how = labeled_split(_args(str(recipe)), dd, meta)
    assert len(indices) == 150 and how.startswith("re-drawn")


def test_the_run_prints_how_many_rows_are_labelled(tmp_path, capsys):
    make_table(tmp_path, n=30)
    df = pd.read_csv(tmp_path / "table.csv")
    df["lab"] = [i % 2 == 0 for i in range(30)]
    df.to_csv(tmp_path / "table.csv", index=False)
    code, _, err = build(tmp_path / "table.csv", tmp_path / "ds", "--labeled-column", "lab", "--val-fraction", "0.2",
                         "--test-fraction", "0.2")
    assert code == 0, err
    labelled = sum(load_dataset(tmp_path / "ds")[0]["train"]["labeled"])
    recipe = str(ROOT / "recipes" / "fixmatch_synthetic_multimodal.yaml")
    code = run_train([recipe, "--dataset", str(tmp_path / "ds"), "--output_dir", str(tmp_path / "run"),
                      "--max_steps", "1", "--eval_steps", "1", "--per_device_train_batch_size", "2", "--mu", "1",
                      "--report_to", "none", "--disable_tqdm", "true", "--export", "false", "--plots", "false",
                      "--model", "tabular-tiny"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"labelled rows: {labelled} of 18 (dataset's own split" in out, out
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert len(info["labeled_indices"]) == labelled


# ------------------------------------------------------------------------------------------- item 11
def test_views_follow_the_task():
    from data_utils.views import preset_for_task

    assert preset_for_task("default", "landmarks") == "aflw"
    assert preset_for_task("dvm", "landmarks") == "dvm"  # a preset named explicitly is kept
    assert preset_for_task("default", "classification") == "default"


def test_supervised_on_landmark_data_uses_the_landmark_views(tmp_path, synthetic_cache, capsys):
    code = run_train(["--synthetic_task", "landmarks", "--synthetic_num_samples", "120", "--synthetic_image_size", "32",
                      "--dataset_cache_dir", str(synthetic_cache), "--output_dir", str(tmp_path / "run"),
                      "--method", "supervised", "--max_steps", "2", "--eval_steps", "2", "--per_device_train_batch_size", "4",
                      "--report_to", "none", "--disable_tqdm", "true", "--export", "false", "--plots", "false"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]


# ------------------------------------------------------------------------------------------- item 12
def test_two_processes_print_a_configuration_error_once(tmp_path, capfd, monkeypatch):
    """What `accelerate launch --cpu --num_processes 2 train.py` runs (train.py starts the gloo workers),
    with a configuration error each rank meets: one line from the main process, no torchrun report."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train

    for key, value in dict(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29300 + os.getpid() % 300)).items():
        monkeypatch.setenv(key, value)
    code = train.spawn_cpu_workers(2, ["--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "run"),
                                       "--report_to", "none"])
    err = capfd.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: dataset"), err[-3000:]
    assert "ChildFailedError" not in err and "Traceback" not in err
