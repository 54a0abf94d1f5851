"""Recipes against the original scripts: every value of our mean_teacher / mixmatch / l2i_o / l2i_l
CIFAR-10 recipes and mean_teacher / pseudo_label / l2i_o / l2i_l AFLW recipes equals the original
script's (argparse default or hard-coded value, recorded in tests/golden/l2i_original_recipes.json by
scripts/golden/compare_l2i_recipes.py --write from a checkout), unless the difference is listed in
that script's DOCUMENTED with its reason."""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "golden"))

import compare_l2i_recipes as recipes


def _undocumented(rows):
    return [(r, f, ours, theirs) for r, f, ours, theirs, _, same, reason in rows if not same and reason is None]


def test_no_recipe_value_differs_from_the_original_without_a_documented_reason():
    rows = recipes.comparisons()
    assert len({r[0] for r in rows}) == 4 * 5 + 4 * 4  # every CIFAR-10 label count and AFLW fraction
    assert not _undocumented(rows), "recipe values that differ from the original without a documented reason"
    differing = {(r[0].split("_cifar10")[0].split("_aflw")[0], "cifar10" if "cifar10" in r[0] else "aflw", r[1])
                 for r in rows if not r[5]}
    stale = set(recipes.DOCUMENTED) - differing
    assert not stale, f"documented differences that no longer differ (remove them): {sorted(stale)}"


def test_a_changed_value_is_reported():
    table = json.loads(recipes.JSON_PATH.read_text())
    changed = copy.deepcopy(table)
    changed["l2i_o/aflw"]["values"]["inner_lr_multiplier"][0] = 1.0  # the original's 10 x lr, misread
    rows = _undocumented(recipes.comparisons(changed))
    assert {(r[0], r[1]) for r in rows} == {(f"l2i_o_aflw_{b}.yaml", "inner_lr_multiplier") for b in recipes.LABEL_BUDGETS["aflw"]}
