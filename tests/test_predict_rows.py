"""scripts/predict.py on a raw table: each bad row (missing or unreadable image, unseen category,
non-numeric cell) is reported with its column and reason while the other rows are predicted; an unseen
category can be treated as missing."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests._helpers import load_script


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
