"""The data contract's core: TabularSchema, labelled splits, atomic dataset IO."""

import contextlib
import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from data_utils.io import DatasetExistsError, DatasetMetadata, atomic_directory, load_dataset, save_dataset
from data_utils.schema import SchemaError, TabularField, TabularSchema
from data_utils.splits import SplitError, check_labeled_split, select_labeled


def make_schema(allow_missing=True):
    return TabularSchema.fit(
        {"color": ["red", "blue", "red", None], "size": [1.0, 3.0, 5.0, float("nan")], "doors": [2, 4, 4, 2]},
        categorical=["color", "doors"],
        continuous=["size"],
        allow_missing=allow_missing,
    )


def test_fit_vocabularies_statistics_and_model_order():
    schema = make_schema()
    assert schema.names == ["color", "doors", "size"]  # categorical first
    assert schema.categorical_fields[0].categories == ["blue", "red"]
    assert schema.categorical_fields[1].categories == ["2", "4"]
    size = schema.continuous_fields[0]
    assert size.mean == pytest.approx(3.0) and size.std == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert schema.field_lengths == [2, 2, 1]
    assert TabularSchema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_encode_columns_normalises_and_masks_missing():
    schema = make_schema()
    out = schema.encode_columns({"color": [1, None], "doors": [0, 1], "size": [3.0 + schema.continuous_fields[0].std, None]})
    np.testing.assert_array_equal(out["categorical_values"], [[1, 0], [0, 1]])
    np.testing.assert_allclose(out["continuous_values"], [[1.0], [0.0]], atol=1e-6)
    np.testing.assert_array_equal(out["missing_mask"], [[False, False, False], [True, False, True]])


def test_encode_raw_rows_maps_strings_and_rejects_unknown_category():
    schema = make_schema()
    out = schema.encode_raw_rows([{"color": "red", "doors": 4, "size": 3.0}, {"doors": "2"}])
    np.testing.assert_array_equal(out["categorical_values"], [[1, 1], [0, 0]])
    assert out["missing_mask"][1].tolist() == [True, False, True]
    with pytest.raises(SchemaError, match="unknown category 'green' for column 'color'"):
        schema.encode_raw_rows([{"color": "green", "doors": 2, "size": 1.0}])


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"color": [5], "doors": [0], "size": [1.0]}, "code 5 is outside the vocabulary"),
        ({"color": [0], "doors": [0], "size": [float("inf")]}, "infinite value"),
        ({"color": [0], "doors": [0]}, r"lacks tabular column\(s\) \['size'\]"),
    ],
)
def test_encode_columns_errors_name_column_and_fix(columns, message):
    with pytest.raises(SchemaError, match=message):
        make_schema().encode_columns(columns)


def test_missing_values_refused_when_not_allowed():
    schema = make_schema(allow_missing=False)
    with pytest.raises(SchemaError, match="column 'size' row 7: missing/NaN"):
        schema.encode_columns({"color": [0], "doors": [0], "size": [float("nan")]}, row_offset=7)


def test_differences_report_what_a_model_would_misread():
    a = make_schema()
    b = TabularSchema(fields=[TabularField("color", "categorical", ["x", "y", "z"]), TabularField("doors", "categorical", ["2", "4"])])
    diffs = a.differences(b)
    assert any("cardinality 2 vs 3" in d for d in diffs)
    assert any("field counts differ" in d for d in diffs)
    assert a.differences(make_schema()) == []


def test_select_labeled_stratified_every_class_and_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    chosen = select_labeled(labels, fraction=0.1, seed=3)
    assert len(chosen) == 10
    counts = np.bincount(labels[chosen], minlength=3)
    assert counts.tolist() == [5, 3, 2]
    np.testing.assert_array_equal(chosen, select_labeled(labels, fraction=0.1, seed=3))
    assert not np.array_equal(chosen, select_labeled(labels, fraction=0.1, seed=4))
    # a fraction too small for proportional allocation still covers every class
    tiny = select_labeled(labels, num_labeled=3, seed=0)
    assert sorted(labels[tiny].tolist()) == [0, 1, 2]
    per_class = select_labeled(labels, per_class=4, seed=0)
    assert np.bincount(labels[per_class]).tolist() == [4, 4, 4]


def test_select_labeled_and_check_errors():
    labels = np.array([0, 0, 1, 1, 2])
    with pytest.raises(SplitError, match="cannot cover 3 classes"):
        select_labeled(labels, num_labeled=2)
    with pytest.raises(SplitError, match="fewer than per_class=2"):
        select_labeled(labels, per_class=2)
    with pytest.raises(SplitError, match="labelled set is empty"):
        check_labeled_split(labels, np.zeros(5, bool))
    with pytest.raises(SplitError, match=r"classes \[2\] have no labelled"):
        check_labeled_split(labels, np.array([1, 0, 1, 0, 0], bool))


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_save_and_load_dataset_round_trip_and_overwrite_guard(tmp_path):
    schema = make_schema()
    split = datasets.Dataset.from_dict({"color": [0, 1], "doors": [1, 0], "size": [1.0, None], "label": [0, 1]})
    dd = datasets.DatasetDict(train=split, validation=split, test=split)
    meta = DatasetMetadata(task="classification", image_column=None, label_names=["a", "b"], labeled_indices=[0])
    out = tmp_path / "ds"
    save_dataset(dd, out, meta, schema)
    loaded, loaded_meta, loaded_schema = load_dataset(out)
    assert loaded_schema == schema and loaded_meta == meta and loaded_meta.num_labels == 2
    assert loaded["train"]["size"][:] == [1.0, None]
    with pytest.raises(DatasetExistsError, match="--overwrite"):
        save_dataset(dd, out, meta, schema)
    save_dataset(dd, out, DatasetMetadata(task="regression", num_targets=3), None, overwrite=True)
    _, meta2, schema2 = load_dataset(out)
    assert meta2.task == "regression" and meta2.num_labels == 3 and schema2 is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging or trash folders left


def test_load_dataset_rejects_foreign_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a stil dataset"):
        load_dataset(tmp_path)


def test_fit_and_raw_encoding_share_one_category_rule():
    schema = TabularSchema.fit({"doors": [2.0, 4.0]}, categorical=["doors"])
    assert schema.fields[0].categories == ["2", "4"]
    out = schema.encode_raw_rows([{"doors": 4}, {"doors": "2"}, {"doors": 2.0}])
    assert out["categorical_values"][:, 0].tolist() == [1, 0, 0]


def test_a_folder_another_process_wrote_meanwhile_is_kept_not_replaced(tmp_path):
    """Two runs filling one dataset cache: the one that finishes second keeps the first one's folder
    (its readers may have it open) and says so with DatasetExistsError, leaving no staging folder."""
    target = tmp_path / "ds"
    with pytest.raises(DatasetExistsError, match="another process"):
        with atomic_directory(target) as staging:
            (staging / "mine.txt").write_text("late")
            target.mkdir()
            (target / "theirs.txt").write_text("first")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]


def test_a_synthetic_build_that_loses_the_race_uses_the_winners_dataset(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import data_utils.synthetic as synthetic
    from data_utils import preparation

    data = SimpleNamespace(dataset=None, synthetic_task="image", synthetic_num_samples=200, synthetic_image_size=16,
                           labeled_fraction=0.2, dataset_cache_dir=str(tmp_path), bad_images="error")
    real = synthetic.make_synthetic_dataset

    def another_run_finishes_first(task, path, **kwargs):
        real(task, path, **kwargs)  # the other run's copy
        raise DatasetExistsError(f"output folder {path} was written by another process meanwhile")

    monkeypatch.setattr(synthetic, "make_synthetic_dataset", another_run_finishes_first)
    accelerator = SimpleNamespace(is_main_process=True, is_local_main_process=True,
                                  main_process_first=contextlib.nullcontext, local_main_process_first=contextlib.nullcontext)
    monkeypatch.setattr(preparation, "check_images", lambda dataset_dict, *args: dataset_dict)
    source, dataset_dict, metadata, _ = preparation.prepare_dataset(data, accelerator)
    assert "using it" in capsys.readouterr().out
    assert Path(source).parent == tmp_path and len(dataset_dict["train"]) > 0 and metadata.num_labels == 10
