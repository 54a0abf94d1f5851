"""The model card pushed with --push_to_hub: names the repo, leaks no local path or token, records the
recipe, and its Python snippet predicts from a raw row and an image file against the exported folder."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import yaml

from tests._helpers import copy_synthetic_dataset
from tests._helpers import tiny_fixmatch_argv as argv
from tests._helpers import train_captured as train


def test_card_after_push_names_the_repo_and_its_snippet_predicts_from_raw_inputs(tmp_path, synthetic_cache, monkeypatch):
    import re

    import huggingface_hub
    import numpy as np
    from huggingface_hub import ModelCard
    from PIL import Image

    # a dataset whose raw table named its image column "path" (what prepare_dataset.py records)
    data = copy_synthetic_dataset(synthetic_cache, tmp_path / "cars")
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
    code, _, err = train(argv(out, synthetic_cache, "--dataset", str(data), "--max_steps", "2", "--push_to_hub", "true",
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
