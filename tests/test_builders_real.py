"""Builders for real downloads, each on a tiny fixture written in the real layout (tests/real_layouts.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_utils.builders._common import BuildError, run_cli
from data_utils.builders.aflw import build_aflw
from data_utils.builders.cifar10 import build_cifar10, l2i_split
from data_utils.builders.dvm import (
    DVM_COLUMNS,
    build_dvm_prepared,
    build_dvm_raw,
    dvm_low_data_indices,
    dvm_low_data_subsets,
    physical_dimensions,
)
from data_utils.builders.ukbb import balanced_indices, build_ukbb
from data_utils.io import load_dataset

from . import real_layouts

ROOT = Path(__file__).resolve().parents[1]
from tests._helpers import load_script  # noqa: E402

build_aflw_cli = load_script("build_aflw")
build_cifar10_cli = load_script("build_cifar10")
build_dvm_cli = load_script("build_dvm")


# ------------------------------------------------------------------------------------ DVM prepared
@pytest.mark.parametrize("kind", ["identification", "ids", "paths"])
def test_dvm_prepared_values_images_and_subset(tmp_path, kind):
    info = real_layouts.write_dvm_prepared(tmp_path)
    real_layouts.write_dvm_subset_files(tmp_path, info, "0.01", [0, 1, 2, 7], kind)
    out = tmp_path / "out"
    build_dvm_prepared(tmp_path / "features", out, labeled_subset="0.01", progress=False)
    dd, meta, schema = load_dataset(out)
    assert schema.names == DVM_COLUMNS and schema.cardinalities == [22, 13, 3, 12]
    train = dd["train"]
    assert len(train) == 12 and len(dd["validation"]) == 6 and len(dd["test"]) == 6
    assert meta.labeled_indices == [0, 1, 2, 7] and train["labeled"][7] and not train["labeled"][3]
    np.testing.assert_array_equal(train["Color"], info["train"]["cats"][:, 0])
    np.testing.assert_allclose(train["Wheelbase"], info["train"]["cons"][:, 0], atol=1e-5)  # stored as given
    assert train["label"] == info["train"]["labels"] and meta.label_names == ["0", "1", "2"]
    # images: the JPEG bytes (auto prefers .jpg); decoded equals the file
    assert np.array_equal(np.asarray(train[3]["image"]), np.asarray(Image.open(info["train"]["paths"][3])))


def test_dvm_prepared_npy_images_root_and_protocol(tmp_path):
    info = real_layouts.write_dvm_prepared(tmp_path / "orig")
    out = tmp_path / "out"
    # images moved elsewhere: the absolute paths in the .pt files are remapped under --images-root
    (tmp_path / "orig" / "resized_DVM").rename(tmp_path / "moved")
    for jpg in (tmp_path / "moved").rglob("*.jpg"):
        jpg.unlink()  # only the .npy siblings remain
    build_dvm_prepared(tmp_path / "orig" / "features", out, image_format="npy", images_root=tmp_path / "moved",
                       labeled_subset="0.1", labeled_source="protocol", progress=False)
    dd, meta, _ = load_dataset(out)
    moved = str(info["test"]["paths"][2]).replace(str(tmp_path / "orig" / "resized_DVM"), str(tmp_path / "moved"))
    expected = np.load(moved[:-4] + ".npy")
    assert np.array_equal(np.asarray(dd["test"][2]["image"]), expected)
    assert meta.labeled_indices == dvm_low_data_subsets(info["train"]["labels"])["0.1"].tolist()


def test_dvm_prepared_errors(tmp_path, capsys):
    info = real_layouts.write_dvm_prepared(tmp_path)
    features = tmp_path / "features"
    base = ["prepared", "--features-dir", str(features), "--no-progress", "--output", str(tmp_path / "o")]
    # subset files absent
    assert run_cli(build_dvm_cli.main, base + ["--labeled-subset", "0.1"]) == 2
    assert "no 0.1 subset files" in capsys.readouterr().err
    # table vs labels mismatch
    torch.save(info["val"]["labels"][:-1], features / "labels_model_all_val_all_views.pt")
    assert run_cli(build_dvm_cli.main, base) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "6 rows" in err and "5 labels" in err
    torch.save(info["val"]["labels"][:-1] + [7], features / "labels_model_all_val_all_views.pt")
    assert run_cli(build_dvm_cli.main, base) == 2
    assert "label 7" in capsys.readouterr().err
    torch.save(info["val"]["labels"], features / "labels_model_all_val_all_views.pt")
    # out-of-range categorical code
    csv = features / "dvm_features_test_noOH_all_views_physical_jittered_50_reordered.csv"
    lines = csv.read_text().splitlines()
    lines[4] = "25" + lines[4][lines[4].index(","):]
    csv.write_text("\n".join(lines) + "\n")
    assert run_cli(build_dvm_cli.main, base) == 2
    err = capsys.readouterr().err
    assert "row 4" in err and "'Color'" in err and "25" in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- DVM low data
def test_dvm_low_data_protocol_properties():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(rng.integers(20, 300, size=40))])
    labels = labels[rng.permutation(labels.size)]
    subsets = dvm_low_data_subsets(labels)
    ten, one = subsets["0.1"], subsets["0.01"]
    assert ten.size == int(0.1 * labels.size) and one.size == int(0.1 * ten.size)
    assert set(one) <= set(ten)
    for subset in (ten, one):
        assert set(labels[subset]) == set(labels)  # every class has a labelled row
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    assert set(firsts) <= set(ten)  # the critical rows are the first row of each class
    assert np.array_equal(dvm_low_data_subsets(labels)["0.01"], one)  # seeded
    assert not np.array_equal(dvm_low_data_indices(labels, 0.1, seed=1), ten)
    # stratified fill: class shares of the 10 % subset track the full split
    share = np.bincount(labels[ten], minlength=40) / ten.size
    assert np.abs(share - np.bincount(labels, minlength=40) / labels.size).max() < 0.01


# ----------------------------------------------------------------------------------------- DVM raw
def test_dvm_raw_cleaning_split_and_raw_values(tmp_path):
    real_layouts.write_dvm_raw(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_dvm.py"), "raw", "--dvm-root", str(tmp_path),
                           "--min-population", "10", "--labeled-subset", "0.1", "--no-progress", "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    dd, meta, schema = load_dataset(out)
    sizes = {k: len(v) for k, v in dd.items()}
    assert sum(sizes.values()) == 33  # 14+12+10 adverts, minus 3 dropped by cleaning; rare Kia model removed
    assert sizes["test"] in (16, 17) and sizes["validation"] == 4
    assert meta.label_names == ["Audi A3 (7_1)", "Ford Fiesta (29_5)", "BMW X5 (8_12)"]  # first appearance
    rows = [r for split in dd.values() for r in split]
    # raw values (not z-scored) and TIP vocabulary (sorted over the cleaned table, before the class filter)
    assert {r["Adv_year"] for r in rows} == {2018.0}
    assert sorted({r["Engine_size"] for r in rows}) == pytest.approx([1.0, 1.2, 1.4, 1.6])
    assert dd["train"].features["Color"].names == ["Black", "Blue", "Red", "White"]
    wheel = [r["Wheelbase"] for r in rows]
    assert min(wheel) > 2400 and all(w is not None for w in wheel)  # zero wheelbase filled from the same model
    assert schema.continuous_fields[0].name == "Wheelbase"
    assert schema.continuous_fields[0].mean == pytest.approx(np.mean(dd["train"]["Wheelbase"]), rel=1e-6)
    # the 10 % subset of a tiny train split = one critical row per class
    assert len(meta.labeled_indices) == 3 and sorted(np.asarray(dd["train"]["label"])[meta.labeled_indices]) == [0, 1, 2]
    assert meta.split_info["subsets"]["0.1"] == meta.labeled_indices
    assert meta.source["row_counts"]["after_price_join"] == 38


def test_dvm_physical_repair_and_jitter_reproducible():
    import pandas as pd

    extra = pd.DataFrame({"Adv_ID": ["a", "b", "c", "d"], "Genmodel_ID": ["1_1", "1_1", "69_36", "2_2"],
                          "Wheelbase": [0.0, 2600.0, 1.0, float("nan")], "Length": [4000.0] * 4,
                          "Width": [1800.0] * 4, "Height": [1500.0] * 4})
    once = physical_dimensions(extra, jitter=50, seed=2022)
    again = physical_dimensions(extra, jitter=50, seed=2022)
    assert once.equals(again)
    assert abs(once.loc[0, "Wheelbase"] - 2600.0) <= 50  # filled from the same model, then jittered
    assert abs(once.loc[2, "Wheelbase"] - 2612.0) <= 50  # the notebook's manual Peugeot RCZ fix
    assert np.isnan(once.loc[3, "Wheelbase"])  # nothing to fill from: stays missing
    assert not physical_dimensions(extra, jitter=50, seed=1).equals(once)
    assert physical_dimensions(extra, jitter=0, seed=2022).loc[1, "Wheelbase"] == 2600.0


def test_dvm_raw_missing_image_is_refused(tmp_path):
    real_layouts.write_dvm_raw(tmp_path)
    next((tmp_path / "resized_DVM").rglob("*.jpg")).unlink()
    with pytest.raises(BuildError, match="image file.*absent"):
        build_dvm_raw(tmp_path, tmp_path / "out", min_population=10, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- UKBB
def test_ukbb_balanced_subset_and_png_images(tmp_path):
    info = real_layouts.write_ukbb(tmp_path / "final", target="Infarction", sizes=(40, 6, 6))
    out = tmp_path / "out"
    build_ukbb(tmp_path / "final", out, target="Infarction", balanced=True, labeled_subset="0.1", progress=False)
    dd, meta, schema = load_dataset(out)
    train_labels = info["train"]["labels"]
    keep = balanced_indices(train_labels, 2022)
    assert dd["train"]["label"] == [train_labels[i] for i in keep] and sum(dd["train"]["label"]) == 10
    assert len(dd["train"]) == 20 and len(dd["validation"]) == 6  # val stays imbalanced
    assert len(meta.labeled_indices) == 2 and sorted(np.asarray(dd["train"]["label"])[meta.labeled_indices]) == [0, 1]
    assert schema.cardinalities == [2, 3, 4] and schema.num_continuous == 4
    assert dd["train"]["cat_01"] == info["train"]["cats"][keep, 1].tolist()
    image = dd["test"][3]["image"]
    assert image.mode == "RGB" and image.size == (24, 24)
    np.testing.assert_array_equal(np.asarray(image), np.rint(info["test"]["images"][3] * 255).astype(np.uint8))
    assert meta.label_names == ["no_Infarction", "Infarction"]


def test_ukbb_errors(tmp_path):
    real_layouts.write_ukbb(tmp_path, target="CAD")
    with pytest.raises(BuildError, match="cardiac_labels_Infarction_train.pt"):
        build_ukbb(tmp_path, tmp_path / "o", target="Infarction", progress=False)
    torch.save([0, 1], tmp_path / "cardiac_labels_CAD_val.pt")
    with pytest.raises(BuildError, match="do not match.*6 rows.*2 labels"):
        build_ukbb(tmp_path, tmp_path / "o", target="CAD", progress=False)
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- CIFAR
def test_cifar10_l2i_split_and_pixels(tmp_path, capsys):
    info = real_layouts.write_cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", per_class=5)
    out = tmp_path / "out"
    code = run_cli(build_cifar10_cli.main, ["--tarball", str(tmp_path / "cifar-10-python.tar.gz"), "--num-labeled",
                                            "20", "--val-per-class", "1", "--seed", "3", "--no-progress",
                                            "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    dd, meta, schema = load_dataset(out)
    assert schema is None and meta.label_names[0] == "airplane"
    assert len(dd["train"]) == 40 and len(dd["validation"]) == 10 and len(dd["test"]) == 10
    assert len(meta.labeled_indices) == 20
    assert np.bincount(np.asarray(dd["train"]["label"])[meta.labeled_indices]).tolist() == [2] * 10
    assert np.bincount(dd["validation"]["label"]).tolist() == [1] * 10
    original = meta.split_info["original_train_indices"]["train"]
    pixels = info["data"][original[5]].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(dd["train"][5]["image"]), pixels)
    assert dd["train"][5]["label"] == info["labels"][original[5]]
    assert np.array_equal(np.asarray(dd["test"][0]["image"]), info["test"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    # same seed -> same split; rule: per class first n/10 labelled, last v validation
    lab, unl, val = l2i_split(info["labels"], 20, seed=3, val_per_class=1)
    assert np.array_equal(np.sort(np.asarray(original)[meta.labeled_indices]), lab)
    assert run_cli(build_cifar10_cli.main, ["--tarball", str(tmp_path / "cifar-10-python.tar.gz"),
                                            "--num-labeled", "25", "--output", str(tmp_path / "o2")]) == 2
    assert "multiple of 10" in capsys.readouterr().err


def test_cifar10_refuses_non_numpy_pickles(tmp_path):
    import io
    import pickle
    import tarfile

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        payload = pickle.dumps({b"label_names": Evil()})
        entry = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        entry.size = len(payload)
        tar.addfile(entry, io.BytesIO(payload))
    with pytest.raises(BuildError, match="not a CIFAR pickle batch"):
        build_cifar10(path, tmp_path / "o", progress=False)


# --------------------------------------------------------------------------------------------- AFLW
def test_aflw_landmarks_modes_and_validation(tmp_path, capsys):
    info = real_layouts.write_aflw(tmp_path / "aflw_release-2", n_train=20, n_test=5)
    out = tmp_path / "out"
    code = run_cli(build_aflw_cli.main, ["--aflw-root", str(tmp_path / "aflw_release-2"), "--labeled-fraction",
                                         "0.25", "--seed", "1", "--no-progress", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    dd, meta, _ = load_dataset(out)
    assert meta.task == "landmarks" and meta.num_targets == 10
    assert len(dd["train"]) == 18 and len(dd["validation"]) == 2 and len(dd["test"]) == 5
    assert len(meta.labeled_indices) == round(18 * 0.25)
    gt = info["train"]["gt"]
    np.testing.assert_allclose(dd["train"][3]["label"], gt[3][:, ::-1].reshape(-1), rtol=1e-6)  # (y,x) -> (x,y)
    np.testing.assert_allclose(dd["validation"][1]["label"], gt[19][:, ::-1].reshape(-1), rtol=1e-6)  # last entries
    assert dd["train"][1]["image"].mode == "L" and dd["train"][0]["image"].mode == "RGB"  # as stored
    assert dd["train"][2]["image"].size == (20, 32)  # original size: labels are in its pixels


def test_aflw_count_mismatch_and_missing_image(tmp_path):
    import scipy.io

    root = tmp_path / "aflw"
    info = real_layouts.write_aflw(root, n_train=10, n_test=3)
    (root / "output" / info["test"]["names"][1]).unlink()
    with pytest.raises(BuildError, match="row 1.*does not exist"):
        build_aflw(root, tmp_path / "o", progress=False)
    scipy.io.savemat(root / "aflw_train_keypoints.mat", {"gt": info["train"]["gt"][:-1]})
    with pytest.raises(BuildError, match="lists 10 images but aflw_train_keypoints.mat has 9"):
        build_aflw(root, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
