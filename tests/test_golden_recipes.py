"""Every paper recipe of the STiL and TIP repositories against the original's config values
(recorded in tests/golden/recipes_vs_original.json by scripts/golden/compare_recipes.py --write from
the checkouts): no value may differ without a documented reason in that script's DECISIONS."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "golden"))

import compare_recipes  # noqa: E402


def test_no_recipe_value_differs_from_the_original_without_a_reason():
    record = json.loads(compare_recipes.OUTPUT.read_text())
    rows = compare_recipes.compare(record)
    unexplained = [f"{recipe}: {key} ours={mine!r} vs original {source}={theirs!r}"
                   for recipe, key, mine, source, theirs, verdict in rows if verdict == "DIFFERS WITHOUT A REASON"]
    assert not unexplained, "recipe values that differ from the original config without a reason:\n" + "\n".join(unexplained)
    # the record covers every STiL-repository recipe and TIP's, with the training schedule compared in each
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    expected = {f"{prefix}_{split}" for prefix in compare_recipes.STIL_METHODS for split in compare_recipes.SPLITS} & shipped
    assert expected | set(compare_recipes.TIP_RECIPES) <= set(record["recipes"])
    for recipe, entry in record["recipes"].items():
        assert {"learning_rate", "weight_decay", "num_train_epochs", "per_device_train_batch_size"} <= set(entry["values"]), recipe


def test_a_changed_recipe_value_is_caught():
    record = json.loads(compare_recipes.OUTPUT.read_text())
    entry = record["recipes"]["stil_dvm_1pct"]
    entry["values"]["th1"]["value"] = 0.5  # as if the original said 0.5
    rows = [r for r in compare_recipes.compare({"recipes": {"stil_dvm_1pct": entry}}) if r[1] == "th1"]
    assert rows[0][5] == "DIFFERS WITHOUT A REASON"
