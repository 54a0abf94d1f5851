"""`load_dataset` on a bad --dataset: one DatasetError naming the path and what a dataset looks like."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_utils import DatasetError
from data_utils.io import METADATA_FILENAME, DatasetMetadata, load_dataset, save_dataset

LAYOUT = r"save_to_disk folder .* stil_dataset\.json .* Hub dataset id 'owner/name'"


@pytest.fixture
def tiny_dataset(tmp_path):
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"label": [0, 1]}) for s in ("train", "validation", "test")})
    return save_dataset(dd, tmp_path / "ds", DatasetMetadata(image_column=None, label_names=["a", "b"]))


def _error(arg) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(arg)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path_names_it_and_the_expected_layout(tmp_path):
    for arg in ("/no/such/path", str(tmp_path / "nowhere"), "./missing", "a/b/c"):
        message = _error(arg)
        assert f"{arg!r} not found" in message
        assert "HFValidationError" not in message
        assert re.search(LAYOUT, message), message


def test_hub_id_that_cannot_be_reached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = _error("owner/no-such-dataset-xyz")
    assert "'owner/no-such-dataset-xyz' is neither a local folder nor a reachable Hub dataset" in message


def test_folder_that_is_not_a_dataset(tmp_path, tiny_dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a stil dataset" in _error(empty) and "the folder is empty" in _error(empty)
    (empty / "notes.txt").write_text("x")
    assert "holds notes.txt" in _error(empty)
    # one split of a dataset: a save_to_disk folder but no stil metadata
    message = _error(tiny_dataset / "train")
    assert "save_to_disk folder without stil metadata" in message and str(tiny_dataset / "train") in message


def test_a_file_is_not_a_dataset(tmp_path):
    table = tmp_path / "cars.csv"
    table.write_text("a,b\n1,2\n")
    message = _error(table)
    assert "is a file, not a dataset folder" in message and "scripts/prepare_dataset.py --table" in message


def test_unreadable_files_name_the_file(tiny_dataset, monkeypatch):
    assert load_dataset(tiny_dataset)[1].label_names == ["a", "b"]
    meta_file = tiny_dataset / METADATA_FILENAME
    good = meta_file.read_text()
    meta_file.write_text("{not json")
    assert f"cannot read the dataset metadata {meta_file}" in _error(tiny_dataset)
    meta_file.write_text(json.dumps({"task": "segmentation"}))
    assert "invalid dataset metadata" in _error(tiny_dataset) and "segmentation" in _error(tiny_dataset)
    meta_file.write_text(good)

    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == METADATA_FILENAME:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert "Permission denied" in _error(tiny_dataset)
    monkeypatch.undo()

    (tiny_dataset / "dataset_dict.json").unlink()
    message = _error(tiny_dataset)
    assert f"cannot read the dataset splits in {tiny_dataset}" in message


def test_train_cli_prints_one_line(tmp_path, capsys):
    from tests._helpers import run_train

    assert run_train(["--dataset", "/no/such/path", "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.py: error: dataset '/no/such/path' not found" in err[0]
