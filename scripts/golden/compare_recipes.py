#!/usr/bin/env python
"""Our paper recipes side by side with the original configuration files they reproduce.

    STIL_ORIGINAL_SRC=<siyi-wind/STiL> TIP_ORIGINAL_SRC=<siyi-wind/TIP> python scripts/golden/compare_recipes.py [--write]

For every recipe of the STiL repository's experiments (STiL, the image and multimodal Match ports,
MMatch, co-training; DVM and UK Biobank CAD / Infarction at 1 % and 10 %) and TIP pretraining, the
original's values are read from its Hydra files (main config, then ``models/resnet50.yaml``, then the
dataset file, later files winning, as Hydra's defaults list composes them) and printed next to our
resolved recipe (``extends`` followed). Compared: every recipe key whose name is also a key of the
original config, plus the renamed ones in ``RENAMED``. A difference is allowed only with a reason in
``DECISIONS`` (each names the docs/methods.md section that explains it).

``--write`` records the original values in tests/golden/recipes_vs_original.json, which
tests/test_golden_recipes.py checks against the recipes without the checkouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "tests" / "golden" / "recipes_vs_original.json"

SPLITS = {"dvm_1pct": ("dvm", "dvm_all_server_reordered_SemiPseudo_0.01"),
          "dvm_10pct": ("dvm", "dvm_all_server_reordered_SemiPseudo_0.1"),
          "ukbb_cad_1pct": ("cardiac", "cardiac_CAD_SemiPseudo_0.01"),
          "ukbb_cad_10pct": ("cardiac", "cardiac_CAD_SemiPseudo_0.1"),
          "ukbb_infarction_1pct": ("cardiac", "cardiac_Infarction_SemiPseudo_0.01"),
          "ukbb_infarction_10pct": ("cardiac", "cardiac_Infarction_SemiPseudo_0.1")}
# our recipe prefix -> the original's config name (configs/config_<dataset>_<name>.yaml)
STIL_METHODS = {"stil": "STiL", "simmatch": "SimMatch", "freematch": "FreeMatch", "comatch": "CoMatch",
                "multimodal_simmatch": "MultiSimMatch", "multimodal_freematch": "MultiFreeMatch",
                "multimodal_comatch": "MultiCoMatch", "mmatch": "MMatch", "co_training": "CoTrain"}
TIP_RECIPES = {"tip_dvm": ("config_dvm_TIP.yaml", "dvm_all_server_reordered"),
               "tip_ukbb": ("config_cardiac_TIP.yaml", "cardiac_CAD")}

# our key -> (original key, how the original value maps to ours)
RENAMED = {
    "learning_rate": ("lr_eval", None),  # semi-supervised runs (evaluate.py) use lr_eval
    "weight_decay": ("weight_decay_eval", None),
    "num_train_epochs": ("max_epochs", None),
    "mu": ("unlabelled_ratio", None),
    "per_device_train_batch_size": ("batch_size", "labelled"),  # batch_size = B_l (1 + unlabelled_ratio)
}
TIP_RENAMED = {"learning_rate": ("lr", None), "weight_decay": ("weight_decay", None),
               "num_train_epochs": ("max_epochs", None), "per_device_train_batch_size": ("batch_size", None)}
# keys that share a name with an original key but mean something else in ours (never compared)
NOT_THE_SAME = {
    "augmentation_rate": "ours: the rate of the view the method trains on; the original's augmentation_rate is "
                         "TIP pretraining's, the semi-supervised views use eval_train_augment_rate",
    "model": "ours: a preset name; the original's: the torchvision backbone name (resnet50 in both)",
    "momentum": "ours: SGD momentum (unused with Adam); the original's `momentum: 0.99` is an unused MMCL "
                "(BYOL/SimSiam) leftover, the EMA momentum is ema_momentum in both",
    "threshold": "ours: the method's own confidence threshold (SimMatch/CoMatch sim_threshold / threshold of the "
                 "method section); the original's top-level `threshold: 0.9` is an unused MMCL leftover",
}
# (recipe pattern, key) -> the documented reason a value differs from the original's
DECISIONS = {
    ("*comatch_*", "projection_dim"): "the method's projection_dim applies only to a model without a projection "
                                      "head; the recipes' presets carry the original's 128-wide head (model config "
                                      "projection_dim), docs/methods.md \"comatch\"",
}


def _load_hydra(paths: list[Path]) -> dict:
    from omegaconf import OmegaConf

    parts = []
    for path in paths:
        part = OmegaConf.load(path)
        part.pop("defaults", None)
        parts.append(part)
    return OmegaConf.to_container(OmegaConf.merge(*parts), resolve=False)


def recipe_sources(stil_src: str | None, tip_src: str | None) -> dict[str, list[Path]]:
    """recipe name -> the original files composing its configuration (only where the checkout is given)."""
    out = {}
    if stil_src:
        configs = Path(stil_src) / "configs"
        for prefix, name in STIL_METHODS.items():
            for split, (dataset, dataset_file) in SPLITS.items():
                recipe = f"{prefix}_{split}"
                if (ROOT / "recipes" / f"{recipe}.yaml").is_file():
                    out[recipe] = [configs / f"config_{dataset}_{name}.yaml", configs / "models" / "resnet50.yaml",
                                   configs / "dataset" / f"{dataset_file}.yaml"]
    if tip_src:
        configs = Path(tip_src) / "configs"
        for recipe, (main, dataset_file) in TIP_RECIPES.items():
            out[recipe] = [configs / main, configs / "models" / "resnet50.yaml", configs / "dataset" / f"{dataset_file}.yaml"]
    return out


def original_values(recipe: str, original: dict, ours: dict) -> dict:
    """The original's value for every compared key of ours (in our units)."""
    renamed = TIP_RENAMED if recipe.startswith("tip_") else RENAMED
    values = {}
    for key in ours:
        if key in NOT_THE_SAME:
            continue
        if key in renamed:
            source, how = renamed[key]
            if source not in original:
                continue
            value = original[source]
            if how == "labelled":
                value = value // (1 + int(original["unlabelled_ratio"]))
            values[key] = {"original_key": source, "value": value}
        elif key in original and not isinstance(original[key], (dict, list)):
            values[key] = {"original_key": key, "value": original[key]}
    return values


def our_values(recipe: str) -> dict:
    from modeling_stil.training.arguments import parse_run_arguments

    return parse_run_arguments([str(ROOT / "recipes" / f"{recipe}.yaml")]).flat_dict()


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def reason(recipe: str, key: str):
    from fnmatch import fnmatch

    return next((why for (pattern, name), why in DECISIONS.items() if name == key and fnmatch(recipe, pattern)), None)


def compare(record: dict) -> list[tuple]:
    """Rows (recipe, key, ours, original key, original, verdict) of a recorded comparison."""
    rows = []
    for recipe, entry in sorted(record["recipes"].items()):
        ours = our_values(recipe)
        for key, orig in sorted(entry["values"].items()):
            mine = ours.get(key)
            if same(mine, orig["value"]):
                verdict = "same"
            else:
                why = reason(recipe, key)
                verdict = f"differs: {why}" if why else "DIFFERS WITHOUT A REASON"
            rows.append((recipe, key, mine, orig["original_key"], orig["value"], verdict))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"record the original values in {OUTPUT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    sources = recipe_sources(os.environ.get("STIL_ORIGINAL_SRC"), os.environ.get("TIP_ORIGINAL_SRC"))
    if not sources:
        print("set STIL_ORIGINAL_SRC and/or TIP_ORIGINAL_SRC to checkouts of the originals")
        return 2
    record = {"about": "original config values per recipe, written by scripts/golden/compare_recipes.py --write",
              "recipes": {}}
    for recipe, files in sorted(sources.items()):
        original = _load_hydra(files)
        root = Path(files[0]).parents[1]
        record["recipes"][recipe] = {"files": [str(f.relative_to(root)) for f in files],
                                     "values": original_values(recipe, original, our_values(recipe))}
    rows = compare(record)
    width = max(len(r[1]) for r in rows)
    for recipe, key, mine, source, theirs, verdict in rows:
        print(f"{recipe:32s} {key:{width}s} ours={mine!s:<12} {source}={theirs!s:<12} {verdict}")
    unexplained = [r for r in rows if r[5] == "DIFFERS WITHOUT A REASON"]
    print(f"{len(rows)} values compared over {len(record['recipes'])} recipes; {len(unexplained)} differ without a reason")
    if args.write:
        OUTPUT.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
