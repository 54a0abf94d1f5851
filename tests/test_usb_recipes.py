"""Our CIFAR-10 recipes against USB's classic-CV configs (scripts/golden/usb_recipes.py; USB's values are
in tests/golden/usb_cifar10_configs.json, written by that script from a checkout, so no checkout is
needed here): every USB value has a rule, every rule's values agree, and every value that differs on
purpose has its reason in docs/methods.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("usb_recipes", ROOT / "scripts" / "golden" / "usb_recipes.py")
usb_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(usb_recipes)

ORIGINALS = json.loads(usb_recipes.ORIGINALS_JSON.read_text())
PAIRS = [
    (algorithm, labels)
    for algorithm, by_labels in sorted(ORIGINALS["configs"].items())
    for labels in sorted(by_labels)
    if usb_recipes.our_recipe(algorithm, labels) is not None
]


def test_every_recipe_with_a_usb_config_is_compared():
    assert {(a, l) for a, l in PAIRS} >= {(a, l) for a in ("fixmatch", "freematch", "simmatch", "comatch") for l in ("250", "4000")}


@pytest.mark.parametrize("algorithm,labels", PAIRS)
def test_recipe_equals_usb_config_or_says_why(algorithm, labels):
    rows = usb_recipes.compare(algorithm, ORIGINALS["configs"][algorithm][labels], ORIGINALS["code_defaults"],
                               usb_recipes.our_recipe(algorithm, labels))
    bad = [f"{key}: USB {value!r} vs ours {our_key}={ours!r} ({status})" for key, value, our_key, ours, status in rows
           if status in ("differs", "unmapped")]
    assert not bad, f"recipes/{algorithm}_cifar10_{labels}.yaml vs USB: " + "; ".join(bad)
    docs = (ROOT / "docs" / "methods.md").read_text()
    assert usb_recipes.DOCS_SECTION in docs
    section = docs.split(usb_recipes.DOCS_SECTION, 1)[1].split("\n## ", 1)[0]
    for key, _, _, _, status in rows:
        if status.startswith("decision: "):
            assert status[len("decision: "):] in section, f"{key}: the reason is not in docs/methods.md {usb_recipes.DOCS_SECTION!r}"



def test_a_recipe_that_differs_is_reported():
    """The comparison can fail: FixMatch's recipe with our default ``ema_warmup: true`` (USB's EMA
    momentum is constant) is reported as a difference."""
    ours = {**usb_recipes.our_recipe("fixmatch", "250"), "ema_warmup": True}
    rows = usb_recipes.compare("fixmatch", ORIGINALS["configs"]["fixmatch"]["250"], ORIGINALS["code_defaults"], ours)
    assert [row[0] for row in rows if row[-1] == "differs"] == ["ema_momentum_rule"]
