"""Mistakes a new user makes stop train.py with one `train.py: error:` line naming the problem and the fix,
before any file is written: an unknown or unsuitable model, an undecodable image (or it is skipped on
request), a damaged dataset file."""

from __future__ import annotations

import pytest

from tests._helpers import copy_synthetic_dataset, one_error_line
from tests._helpers import tiny_fixmatch_argv as argv
from tests._helpers import train_captured as train


@pytest.mark.parametrize("extra, expected", [
    (("--model", "image-tny"), "unknown model 'image-tny'"),
    (("--model", "tip-tiny", "--method", "supervised"), "without a prediction head"),
    (("--model", "stil-tiny", "--method", "supervised", "--synthetic_task", "image"), "image-only"),
])
def test_model_mistakes_are_one_line_before_any_file(tmp_path, synthetic_cache, extra, expected):
    out = tmp_path / "run"
    line = one_error_line(*train(argv(out, synthetic_cache, *extra))[::2])
    assert expected in line
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_undecodable_image_is_named_before_training_or_skipped(tmp_path, synthetic_cache):
    import datasets

    from data_utils.io import load_dataset

    data = copy_synthetic_dataset(synthetic_cache, tmp_path / "ds")
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
    line = one_error_line(*train(argv(tmp_path / "r1", synthetic_cache, "--dataset", str(bad)))[::2])
    assert "train row 7" in line and "--bad_images skip" in line
    assert not (tmp_path / "r1").exists()
    code, out, err = train(argv(tmp_path / "r2", synthetic_cache, "--dataset", str(bad), "--bad_images", "skip", "--max_steps", "2"))
    assert code == 0, err[-3000:]
    assert "dropped 1 row(s)" in out + err and "train row 7" in out + err


def test_damaged_dataset_file_names_the_file_and_the_fix(tmp_path, synthetic_cache):
    data = copy_synthetic_dataset(synthetic_cache, tmp_path / "ds")
    arrow = next((data / "validation").glob("*.arrow"))
    arrow.write_bytes(b"\x00" * 64 + arrow.read_bytes()[64:200])
    line = one_error_line(*train(argv(tmp_path / "r", synthetic_cache, "--dataset", str(data)))[::2])
    assert "validation/" in line and arrow.name in line and "rebuild" in line
