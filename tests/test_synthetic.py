"""Synthetic datasets: determinism, DVM schema, labelled splits, landmarks geometry, information budget, CLI."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from data_utils.io import METADATA_FILENAME, load_dataset
from data_utils.schema import SCHEMA_FILENAME
from data_utils.synthetic import (
    CATEGORICAL_FIELDS, CONTINUOUS_FIELDS, SyntheticConfigError, _png_batch, _render_cars, car_image_params, bayes_ceilings, factor_grid,
    information_budget, make_image, make_landmarks, make_multimodal, make_synthetic_dataset,
)

ROOT = Path(__file__).resolve().parent.parent
DVM_CATEGORICAL = ["Color", "Bodytype", "Gearbox", "Fuel_type"]
DVM_CARDINALITIES = [22, 13, 3, 12]
DVM_CONTINUOUS = [
    "Wheelbase", "Height", "Width", "Length", "Adv_year", "Adv_month", "Reg_year", "Runned_Miles", "Price",
    "Seat_num", "Door_num", "Entry_price", "Engine_size",
]


@pytest.fixture(scope="module")
def small_multimodal():
    return make_multimodal(num_samples=300, image_size=24, seed=5)


def _arrays(image_column):
    return np.stack([np.asarray(img) for img in image_column])


def test_same_seed_same_dataset_other_seed_differs():
    first, meta_a, schema_a = make_multimodal(num_samples=200, image_size=16, seed=11)
    second, meta_b, schema_b = make_multimodal(num_samples=200, image_size=16, seed=11)
    other, _, _ = make_multimodal(num_samples=200, image_size=16, seed=12)
    for split in ("train", "validation", "test"):
        assert first[split].data.table.equals(second[split].data.table)
    assert meta_a.to_dict() == meta_b.to_dict() and schema_a == schema_b
    assert not first["train"].data.table.equals(other["train"].data.table)
    for maker in (make_image, make_landmarks):
        a, _, _ = maker(num_samples=100, image_size=16, seed=3)
        b, _, _ = maker(num_samples=100, image_size=16, seed=3)
        assert a["train"].data.table.equals(b["train"].data.table)


def test_multimodal_has_dvm_schema_raw_values_and_codes_in_vocabularies(small_multimodal):
    dataset_dict, metadata, schema = small_multimodal
    assert schema.names == DVM_CATEGORICAL + DVM_CONTINUOUS
    assert schema.cardinalities == DVM_CARDINALITIES and schema.num_continuous == 13
    assert schema.field_lengths == DVM_CARDINALITIES + [1] * 13
    assert list(CATEGORICAL_FIELDS) == DVM_CATEGORICAL and CONTINUOUS_FIELDS == DVM_CONTINUOUS
    train = dataset_dict["train"]
    assert train.column_names == ["image"] + DVM_CATEGORICAL + DVM_CONTINUOUS + ["label", "labeled"]
    assert dataset_dict["test"].column_names == ["image"] + DVM_CATEGORICAL + DVM_CONTINUOUS + ["label"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["label"].num_classes == 20 and metadata.label_names == train.features["label"].names
    assert train.features["labeled"].dtype == "bool"
    for name, cardinality in zip(DVM_CATEGORICAL, DVM_CARDINALITIES):
        feature = train.features[name]
        assert isinstance(feature, datasets.ClassLabel) and feature.num_classes == cardinality
        assert feature.names == schema.categorical_fields[DVM_CATEGORICAL.index(name)].categories
        for split in dataset_dict.values():
            codes = np.asarray(split[name])
            assert codes.min() >= 0 and codes.max() < cardinality
    for name in DVM_CONTINUOUS:
        assert train.features[name].dtype == "float32"
    # raw physical units (not z-scored); the schema holds the train-split statistics
    length = np.asarray(train["Length"], dtype=np.float64)
    assert 3500 < length.mean() < 5500
    field = schema.continuous_fields[DVM_CONTINUOUS.index("Length")]
    assert field.mean == pytest.approx(length.mean(), rel=1e-6) and field.std == pytest.approx(length.std(), rel=1e-4)
    assert set(np.unique(train["Adv_year"])) <= {2017.0, 2018.0}
    encoded = schema.encode_columns({name: train[name] for name in schema.names})
    assert abs(encoded["continuous_values"].mean(0)).max() < 1e-3
    image = train[0]["image"]
    assert image.mode == "RGB" and image.size == (24, 24)


def test_labelled_split_covers_every_class_and_matches_metadata(small_multimodal):
    dataset_dict, metadata, _ = small_multimodal
    train = dataset_dict["train"]
    labeled = np.asarray(train["labeled"])
    labels = np.asarray(train["label"])
    assert metadata.labeled_indices == np.flatnonzero(labeled).tolist()
    assert set(labels[labeled]) == set(range(20))
    assert labeled.sum() == max(20, round(0.01 * len(train)))
    sizes = metadata.split_info["split_sizes"]
    assert sizes == {name: len(split) for name, split in dataset_dict.items()}
    assert sizes["train"] == pytest.approx(0.6 * 300, abs=20) and sizes["test"] == pytest.approx(0.2 * 300, abs=20)
    for split in dataset_dict.values():  # stratified: every class in every split
        assert set(split["label"]) == set(range(20))


def test_factor_grid_and_bayes_ceilings():
    a, b, g, A, B = factor_grid(20, 5, 4, 2, seed=0)
    assert (A, B) == (5, 4) and len(set(zip(a, b))) == 20
    np.testing.assert_array_equal(g, (a + b) % 2)
    ceilings = bayes_ceilings(a, b, g)
    assert ceilings["image_only"] == pytest.approx(0.5) and ceilings["table_only"] == pytest.approx(0.4)
    assert ceilings["joint"] == pytest.approx(1.0) and ceilings["chance"] == pytest.approx(0.05)
    a, b, g, A, B = factor_grid(50, 5, 4, 2, seed=0)  # grows the grid, keeps classes distinct
    assert A * B >= 50 and abs(A - B) <= 1 and len(set(zip(a, b))) == 50


def test_metadata_records_factors_and_the_instance_geometry_is_drawn(small_multimodal):
    dataset_dict, metadata, _ = small_multimodal
    source = metadata.source
    assert source["builder"] == "synthetic" and source["generator_version"]
    assert len(source["factor_assignments"]) == 20
    assert source["bayes_ceilings_noise_free"]["joint"] == pytest.approx(1.0)


def test_car_pictures_draw_the_rows_own_length_and_height(small_multimodal):
    """Instance-level shared geometry: the body's pixel extent follows the row's raw Length/Height."""
    dataset_dict, _, _ = small_multimodal
    train = dataset_dict["train"].select(range(40))
    table = {name: np.asarray(train[name], dtype=np.float64) for name in ["Length", "Height", "Wheelbase", "Color"]}
    table["Color"] = table["Color"].astype(int)
    motif = np.full(40, 4)  # plain body
    size = 64

    def body_extent(scale_length, scale_height):
        scaled = dict(table, Length=table["Length"] * scale_length, Height=table["Height"] * scale_height)
        params = car_image_params(scaled, motif, np.zeros(40), size, np.random.default_rng(0))
        params["body_rgb"] = np.tile(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (40, 1))  # pure red
        params["bg_level"] = np.full(40, 0.5)
        images = _render_cars(params, size)(0, 40, np.random.default_rng(1))
        red = (images[..., 0] - images[..., 1]) > 0.5
        width = np.array([np.ptp(np.flatnonzero(m.any(0))) for m in red])
        height = np.array([np.ptp(np.flatnonzero(m.any(1))) for m in red])
        return width, height

    width, height = body_extent(1.0, 1.0)
    longer, _ = body_extent(1.15, 1.0)
    _, taller = body_extent(1.0, 1.2)
    assert (longer > width).mean() > 0.9 and (taller > height).mean() > 0.9
    assert np.corrcoef(table["Length"], width)[0, 1] > 0.5


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    for shape, mode in (((3, 7, 9, 3), "RGB"), ((2, 5, 6), "L")):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        for array, blob in zip(pixels, _png_batch(pixels)):
            with Image.open(io.BytesIO(blob)) as decoded:
                assert decoded.mode == mode
                np.testing.assert_array_equal(np.asarray(decoded), array)


def test_image_task_shapes_and_no_schema(tmp_path):
    dataset_dict, metadata, schema = make_image(num_samples=200, seed=1)
    assert schema is None and metadata.image_column == "image" and metadata.task == "classification"
    assert dataset_dict["train"].column_names == ["image", "label", "labeled"]
    assert dataset_dict["train"].features["label"].num_classes == 10
    images = _arrays(dataset_dict["validation"]["image"])
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert set(dataset_dict["train"]["label"]) == set(range(10))
    out = make_synthetic_dataset("image", tmp_path / "cifarish", num_samples=120, image_size=16, seed=0)
    assert not (out / SCHEMA_FILENAME).exists()
    loaded, loaded_meta, loaded_schema = load_dataset(out)
    assert loaded_schema is None and loaded_meta.source["task"] == "image" and len(loaded["test"]) > 0


def test_landmarks_inside_image_and_eyes_are_drawn_there():
    dataset_dict, metadata, schema = make_landmarks(num_samples=120, seed=4)
    assert schema is None and metadata.task == "landmarks" and metadata.num_targets == 10
    train = dataset_dict["train"]
    assert train.column_names == ["image", "label", "labeled"] and np.asarray(train["labeled"]).any()
    images = _arrays(train["image"]).astype(np.float32)
    assert images.shape[1:] == (60, 60) and train[0]["image"].mode == "L"
    points = np.asarray(train["label"], dtype=np.float32).reshape(-1, 5, 2)
    assert points.min() >= 0 and points.max() < 60
    assert (points[:, 0, 0] < points[:, 1, 0]).all() and (points[:, 3, 0] < points[:, 4, 0]).all()  # left, right
    assert (points[:, 2, 1] > points[:, :2, 1].max(1)).all() and (points[:, 3, 1] > points[:, 2, 1]).all()
    rows = np.arange(len(images))
    for eye in (0, 1):
        x, y = np.floor(points[:, eye]).astype(int).T
        at_eye = images[rows, y, x]
        # pupils are dark: much darker than a patch a few pixels below the eye (cheek)
        cheek = images[rows, np.minimum(y + 6, 59), x]
        assert (at_eye < cheek - 40).mean() > 0.95
    # a wrong target (the image centre) is not dark in general
    assert (images[rows, 30, 30] < images[rows, np.minimum(y + 6, 59), x] - 40).mean() < 0.5


def test_information_budget_joint_beats_each_modality():
    dataset_dict, metadata, schema = make_multimodal(num_samples=2000, image_size=32, seed=0)
    budget = information_budget(dataset_dict, metadata, schema, random_forest=False)
    acc = budget["test_accuracy"]
    single = max(acc["table_logreg"], acc["image_logreg_features"])
    assert acc["joint_logreg"] > single + 0.2, acc
    assert 0.15 < acc["table_logreg"] < 0.5 and 0.15 < acc["image_logreg_features"] < 0.6, acc
    assert acc["joint_logreg_labeled_only"] < acc["joint_logreg"] - 0.2  # room for unlabelled data
    assert budget["bayes_ceilings_noise_free"]["image_only"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"num_classes": 1}, "--num-classes"),
        ({"image_size": 8}, "--image-size"),
        ({"labeled_fraction": 0.0}, "--labeled-fraction"),
        ({"labeled_fraction": 1.5}, "--labeled-fraction"),
        ({"num_samples": 5}, "--num-samples"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, fix):
    with pytest.raises(SyntheticConfigError, match=fix):
        make_synthetic_dataset("multimodal", tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def explode(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", explode)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_dataset("landmarks", tmp_path / "faces", num_samples=30, image_size=16)
    assert list(tmp_path.iterdir()) == []


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_writes_refuses_existing_output_and_bad_arguments(tmp_path):
    output = tmp_path / "synth"
    done = _cli("--task", "multimodal", "--output", str(output), "--num-samples", "120", "--image-size", "16",
                "--num-classes", "4", "--seed", "7", "--no-progress")
    assert done.returncode == 0, done.stderr
    metadata = json.loads((output / METADATA_FILENAME).read_text())
    assert metadata["source"]["args"]["seed"] == 7 and metadata["label_names"] and metadata["labeled_indices"]
    assert (output / SCHEMA_FILENAME).is_file()
    before = sorted(p.name for p in output.rglob("*"))

    refused = _cli("--task", "multimodal", "--output", str(output), "--num-samples", "120", "--image-size", "16",
                   "--num-classes", "4", "--no-progress")
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "--overwrite" in lines[0] and "Traceback" not in refused.stderr
    assert sorted(p.name for p in output.rglob("*")) == before

    bad = _cli("--task", "multimodal", "--output", str(tmp_path / "bad"), "--num-classes", "1", "--no-progress")
    assert bad.returncode != 0 and "--num-classes" in bad.stderr and "Traceback" not in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # nothing written, no partial folder
