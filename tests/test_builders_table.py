"""scripts/prepare_dataset.py: a user table + images -> stil dataset, and every refusal it owes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_utils.builders._common import run_cli, stratified_partition
from data_utils.io import load_dataset
from data_utils.schema import TabularSchema

ROOT = Path(__file__).resolve().parents[1]
from tests._helpers import load_script  # noqa: E402
from tests.helpers.user_table import BASE, make_table  # noqa: E402

prepare_dataset = load_script("prepare_dataset")

def run(args, capsys=None):
    code = run_cli(prepare_dataset.main, [str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    return code, err



@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_builds_dataset_with_train_only_statistics(tmp_path, suffix, capsys):
    table = make_table(tmp_path, suffix=suffix)
    out = tmp_path / "out"
    code, err = run(["--table", table, *BASE, "--val-fraction", "0.25", "--test-fraction", "0.25",
                     "--labeled-per-class", "2", "--seed", "3", "--output", out], capsys)
    assert code == 0, err
    dd, meta, schema = load_dataset(out)
    assert {k: len(v) for k, v in dd.items()} == {"train": 12, "validation": 6, "test": 6}
    # stratified: each class equally represented in each split
    for split in ("validation", "test"):
        assert sorted(np.bincount(dd[split]["label"]).tolist()) == [2, 2, 2]
    assert meta.label_names == ["a", "b", "c"] and meta.task == "classification"
    assert schema.names == ["color", "doors", "length", "price"]
    train = dd["train"]
    # train-only statistics, computed on raw values, with the NaN row ignored
    lengths = pd.read_csv(table) if suffix == ".csv" else pd.read_parquet(table)
    train_len = [v for v in train["length"] if v is not None]
    assert schema.continuous_fields[0].mean == pytest.approx(np.mean(train_len), rel=1e-6)
    assert schema.continuous_fields[0].mean != pytest.approx(lengths["length"].mean(), rel=1e-9)
    # raw values stored; missing kept as null; labelled split stored twice and consistent
    all_rows = [r for s in dd.values() for r in s]
    assert sum(r["length"] is None for r in all_rows) == 1 and sum(r["color"] is None for r in all_rows) == 1
    assert sorted(v for v in (r["price"] for r in all_rows)) == [1000.0 * (i + 1) for i in range(24)]
    assert sum(train["labeled"]) == 6 == len(meta.labeled_indices)
    assert [i for i, f in enumerate(train["labeled"]) if f] == meta.labeled_indices
    assert np.bincount(np.asarray(train["label"])[meta.labeled_indices]).tolist() == [2, 2, 2]
    assert meta.split_info["per_class"] == 2 and meta.split_info["seed"] == 3
    assert train.features["color"].names == ["blue", "green", "red"]
    # image bytes are embedded, identical to the file
    image = train[0]["image"]
    assert image.size == (16, 16) and image.mode == "RGB"
    raw = train.with_format("arrow")[0]["image"].to_pylist()[0]["bytes"]
    src = [p for p in (tmp_path / "img").iterdir() if p.read_bytes() == raw]
    assert len(src) == 1


def test_split_column_labeled_column_and_cli_subprocess(tmp_path):
    def mutate(df):
        df["split"] = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
        df["is_lab"] = [i < 6 for i in range(24)]
        return df

    table = make_table(tmp_path, mutate=mutate)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_dataset.py"), "--table", str(table), *BASE,
         "--split-column", "split", "--labeled-column", "is_lab", "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    dd, meta, _ = load_dataset(out)
    assert len(dd["train"]) == 16 and len(dd["validation"]) == 4
    assert meta.labeled_indices == list(range(6))
    assert "split" not in dd["train"].column_names and "is_lab" not in dd["train"].column_names


def test_schema_reuse_and_regression(tmp_path, capsys):
    table = make_table(tmp_path)
    first = tmp_path / "first"
    assert run(["--table", table, *BASE, "--output", first], capsys)[0] == 0
    second = tmp_path / "second"
    code, err = run(["--table", table, "--image-column", "path", "--label-column", "price", "--schema", first,
                     "--task", "regression", "--labeled-fraction", "0.5", "--no-progress", "--output", second], capsys)
    # price is now the label, not a schema column: the schema still names it -> refused with the fix
    assert code == 2 and "'price'" in err
    schema = TabularSchema.load(first)
    schema.fields = [f for f in schema.fields if f.name != "price"]
    schema.save(tmp_path / "s.json")
    code, err = run(["--table", table, "--image-column", "path", "--label-column", "price", "--schema",
                     tmp_path / "s.json", "--task", "regression", "--labeled-fraction", "0.5", "--no-progress",
                     "--output", second], capsys)
    assert code == 2 and "not in the schema" in err and "'model'" in err  # model is an extra column now
    df = pd.read_csv(table).drop(columns=["model"])
    df.to_csv(tmp_path / "reg.csv", index=False)
    code, err = run(["--table", tmp_path / "reg.csv", "--image-column", "path", "--label-column", "price",
                     "--schema", tmp_path / "s.json", "--task", "regression", "--labeled-fraction", "0.5",
                     "--no-progress", "--output", second], capsys)
    assert code == 0, err
    dd, meta, schema2 = load_dataset(second)
    assert meta.task == "regression" and meta.num_targets == 1
    assert schema2 == TabularSchema.load(tmp_path / "s.json")  # reused as is, not refitted
    assert sum(dd["train"]["labeled"]) == round(0.5 * len(dd["train"]))


def corrupt_image(tmp):
    (tmp / "img" / "3.png").write_bytes(b"not a png at all")


def remove_image(tmp):
    (tmp / "img" / "4.png").unlink()


def set_cell(col, row, value):
    def mutate(df):
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
        return df
    return mutate


ERRORS = [
    # (mutate table, change files, extra args, expected fragments)
    (lambda df: df.drop(columns=["price"]), None, [], ["lacks column(s) ['price']"]),
    (set_cell("length", 2, float("inf")), None, [], ["row 2", "'length'", "infinite"]),
    (set_cell("length", 7, 1.0), None, ["--no-missing"], ["row 5", "'color'", "missing"]),
    (set_cell("length", 9, float("nan")), None, ["--no-missing"], ["row 7", "'length'", "NaN"]),
    (set_cell("length", 3, "long"), None, [], ["row 3", "'length'", "not a number"]),
    (None, corrupt_image, [], ["3.png", "corrupt", "row"]),
    (None, remove_image, [], ["row 4", "4.png", "does not exist"]),
    (lambda df: df.assign(model=[-1] + [i % 3 for i in range(1, 24)]), None, [], ["row 0", "negative"]),
    (set_cell("path", 1, "img/0.png"), None, [], ["rows 0 and 1", "img/0.png", "do not match"]),
    (lambda df: df.assign(uid=[0, 1] * 12), None, ["--id-column", "uid"], ["rows 0 and 2", "duplicated", "uid"]),
    (lambda df: df.assign(split=["train"] * 20 + ["test"] * 3 + ["nonsense"]), None, ["--split-column", "split"],
     ["row 23", "'split'", "nonsense"]),
    (lambda df: df.assign(lab=[False] * 24), None, ["--labeled-column", "lab"], ["labelled set is empty"]),
    (lambda df: df.assign(lab=[i % 3 != 2 for i in range(24)]), None, ["--labeled-column", "lab"],
     ["classes [2]", "no labelled"]),
]


@pytest.mark.parametrize("mutate, files, extra, fragments", ERRORS)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, mutate, files, extra, fragments):
    table = make_table(tmp_path, mutate=mutate)
    if files:
        files(tmp_path)
    out = tmp_path / "out"
    code, err = run(["--table", table, *BASE, "--output", out, *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_unseen_labels_categories_and_schema_vocabulary(tmp_path, capsys):
    def mutate(df):
        df["split"] = ["train"] * 18 + ["validation"] * 3 + ["test"] * 3
        df.loc[20, "model"] = "zzz"  # a class that never occurs in train
        return df

    table = make_table(tmp_path, mutate=mutate)
    code, err = run(["--table", table, *BASE, "--split-column", "split", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "row 20" in err and "'zzz'" in err and "never occurs in the train split" in err

    def mutate2(df):
        df["split"] = ["train"] * 18 + ["validation"] * 3 + ["test"] * 3
        df.loc[22, "color"] = "pink"
        return df

    table = make_table(tmp_path, mutate=mutate2)
    code, err = run(["--table", table, *BASE, "--split-column", "split", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "row 22" in err and "'pink'" in err and "--vocabulary-from all" in err
    code, err = run(["--table", table, *BASE, "--split-column", "split", "--vocabulary-from", "all",
                     "--output", tmp_path / "o"], capsys)
    assert code == 0, err
    # the same table against a schema that lacks 'pink' is refused, naming the schema
    schema = TabularSchema.load(tmp_path / "o")
    schema.fields[0].categories = ["blue", "green", "red"]
    schema.save(tmp_path / "s.json")
    code, err = run(["--table", table, "--image-column", "path", "--label-column", "model", "--split-column",
                     "split", "--schema", tmp_path / "s.json", "--output", tmp_path / "o2"], capsys)
    assert code == 2 and "'pink'" in err and "s.json" in err and not (tmp_path / "o2").exists()


def test_integer_labels_out_of_range_and_gaps(tmp_path, capsys):
    table = make_table(tmp_path, mutate=lambda df: df.assign(model=[i % 3 for i in range(24)]))
    code, err = run(["--table", table, *BASE, "--label-names", "x,y", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "out of range" in err and "row 2" in err
    table = make_table(tmp_path, mutate=lambda df: df.assign(model=[(i % 3) * 2 for i in range(24)]))
    code, err = run(["--table", table, *BASE, "--output", tmp_path / "o"], capsys)
    assert code == 2 and "class ids [1, 3]" in err


def test_output_exists_needs_overwrite(tmp_path, capsys):
    table = make_table(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run(["--table", table, *BASE, "--output", out], capsys)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    code, err = run(["--table", table, *BASE, "--output", out, "--overwrite"], capsys)
    assert code == 0 and not (out / "keep.txt").exists()
    assert json.loads((out / "stil_dataset.json").read_text())["source"]["builder"] == "table"


def test_stratified_partition_sizes_and_determinism():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    test, val, train = stratified_partition(labels, [0.2, 0.1], seed=1)
    assert (len(test), len(val), len(train)) == (20, 10, 70)
    assert np.bincount([{"a": 0, "b": 1, "c": 2}[labels[i]] for i in test]).tolist() == [10, 6, 4]
    assert set(test) | set(val) | set(train) == set(range(100)) and not set(test) & set(val)
    again = stratified_partition(labels, [0.2, 0.1], seed=1)
    assert all((x == y).all() for x, y in zip(again, (test, val, train)))
    assert not (stratified_partition(labels, [0.2, 0.1], seed=2)[0] == test).all()
    assert math.isclose(len(stratified_partition(["a"] * 7, [0.5], seed=0)[0]), 4)
