#!/usr/bin/env python
"""Our CIFAR-10 recipes (recipes/*_cifar10_*.yaml) side by side with USB's classic-CV configs.

    python scripts/golden/usb_recipes.py                          # print, from tests/golden/usb_cifar10_configs.json
    USB_ORIGINAL_SRC=<checkout> python scripts/golden/usb_recipes.py --write   # re-read USB's files first

USB = microsoft/Semi-supervised-learning. ``--write`` reads every
``config/classic_cv/<alg>/<alg>_cifar10_<labels>_0.yaml`` of FixMatch, FreeMatch, SimMatch and CoMatch
and the few code defaults those runs also depend on (``CODE_DEFAULTS``: read from USB's source with a
pattern each, stopping if one is not found) into ``tests/golden/usb_cifar10_configs.json``, so that
tests/test_usb_recipes.py runs without the checkout.

Every USB key has a rule in ``RULES`` (per algorithm where they differ):

* ``("same", key, convert)``: our recipe's ``key`` must equal ``convert(usb_value)``;
* ``("decision", key, phrase)``: the values differ on purpose; ``phrase`` is the reason's first
  words in docs/methods.md, section "USB CIFAR-10 recipes against USB's configs";
* ``("plumbing", why)``: where USB writes its files, logs, or how it starts processes: no effect on
  what is trained.

A USB key without a rule, or a "same" rule whose values differ, is reported (and fails the test).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORIGINALS_JSON = ROOT / "tests" / "golden" / "usb_cifar10_configs.json"
ALGORITHMS = ("fixmatch", "freematch", "simmatch", "comatch")
DOCS_SECTION = "## USB CIFAR-10 recipes against USB's configs"

# (file under the checkout, regular expression with one group, name): values the runs depend on that
# the config files do not state
CODE_DEFAULTS = (
    ("semilearn/datasets/cv_datasets/cifar.py", r"def get_cifar\([^)]*include_lb_to_ulb=(\w+)", "include_lb_to_ulb"),
    ("semilearn/core/utils/build.py", r"def get_optimizer\([^)]*nesterov=(\w+)", "nesterov"),
    ("semilearn/core/utils/build.py", r"def get_optimizer\([^)]*bn_wd_skip=(\w+)", "bn_wd_skip"),
    ("semilearn/core/utils/build.py", r"num_cycles=(7\. / 16\.)", "lr_num_cycles"),
    ("train.py", r'"--num_warmup_iter", type=int, default=(\d+)', "num_warmup_iter"),
    # the EMA update's momentum: a constant (self.decay), no warm-up
    ("semilearn/core/utils/misc.py", r"new_average = \(1\.0 - (self\.decay)\)", "ema_momentum_rule"),
)

PLUMBING = {
    key: "run plumbing (files, logging, processes): no effect on training"
    for key in ("save_dir", "save_name", "resume", "load_path", "overwrite", "use_tensorboard", "use_wandb",
                "num_log_iter", "data_dir", "num_workers", "world_size", "rank", "multiprocessing_distributed",
                "dist_url", "dist_backend", "gpu", "algorithm", "dataset", "net_from_name")
}


def _same(key, convert=lambda value: value):
    return ("same", key, convert)


def _lower(value):
    return str(value).lower()


def _bool(value):
    return str(value) == "True" if isinstance(value, str) else bool(value)


NO_EPOCH_GATE = _same("(no epoch-based gate)", lambda value: "(no epoch-based gate)")  # FixMatch, FreeMatch

COMMON = {
    "num_train_iter": _same("max_steps"),
    "num_eval_iter": _same("eval_steps"),
    "num_labels": _same("dataset", lambda n: f"datasets/cifar10-{n}"),
    "num_classes": _same("(10 classes: CIFAR-10)", lambda n: "(10 classes: CIFAR-10)" if n == 10 else n),
    "batch_size": _same("per_device_train_batch_size"),
    "eval_batch_size": _same("per_device_eval_batch_size"),
    "uratio": _same("mu"),
    "ema_m": _same("ema_momentum"),
    "crop_ratio": _same("view_preset", lambda ratio: "cifar" if ratio == 0.875 else f"crop_ratio {ratio}"),
    "img_size": _same("view_preset", lambda size: "cifar" if size == 32 else f"img_size {size}"),
    "optim": _same("optimizer", _lower),
    "lr": _same("learning_rate"),
    "momentum": _same("momentum"),
    "weight_decay": _same("weight_decay"),
    "layer_decay": _same("(no layer decay)", lambda value: "(no layer decay)" if float(value) == 1.0 else value),
    "amp": ("decision", "(accelerate config)", "Precision is the launcher's"),
    "clip": _same("max_grad_norm", lambda value: None if float(value) == 0 else value),
    "net": _same("model", lambda name: name.replace("_", "-")),
    "train_sampler": _same("(random shuffling of both streams)", lambda value: "(random shuffling of both streams)"),
    "seed": _same("seed"),
    "ulb_loss_ratio": _same("lambda_u"),
    "p_cutoff": _same("threshold"),
    "use_cat": _same("concat_forward", _bool),
    # USB code defaults (CODE_DEFAULTS)
    "include_lb_to_ulb": _same("unlabeled_includes_labeled", _bool),
    "nesterov": _same("nesterov", _bool),
    "bn_wd_skip": _same("(biases and 1-d parameters not decayed)", lambda value: "(biases and 1-d parameters not decayed)"),
    "lr_num_cycles": _same("lr_scheduler", lambda cycles: "fixmatch_cosine" if cycles.replace(" ", "") == "7./16." else cycles),
    "num_warmup_iter": _same("warmup", int),
    "ema_momentum_rule": _same("ema_warmup", lambda rule: False if rule == "self.decay" else rule),
}

RULES = {
    "fixmatch": {
        **COMMON,
        "epoch": NO_EPOCH_GATE,
        "hard_label": _same("use_hard_labels", _bool),
        "T": ("decision", "temperature", "USB's FixMatch T is unused"),
    },
    "freematch": {
        **COMMON,
        "hard_label": _same("(argmax pseudo-labels)", lambda value: "(argmax pseudo-labels)" if _bool(value) else "soft"),
        "epoch": NO_EPOCH_GATE,
        "T": ("decision", "(none)", "USB's FreeMatch T is unused"),
        "ema_p": _same("sat_momentum"),
        "ent_loss_ratio": _same("lambda_e"),
        "use_quantile": _same("(mean max-probability threshold)", lambda value: "(mean max-probability threshold)" if not _bool(value) else "quantile"),
    },
    "simmatch": {
        **COMMON,
        "use_cat": _same("teacher", lambda value: "online" if _bool(value) else "separate forwards"),
        "epoch": ("decision", "instance_start_epoch", "USB's epoch is 1,024 iterations"),
        "T": _same("temperature_teacher", float),
        "in_loss_ratio": _same("lambda_in"),
        "proj_size": _same("projection_dim"),
        "K": _same("(bank size = labelled rows)", lambda value: "(bank size = labelled rows)"),
        "da_len": _same("da_len"),
        "smoothing_alpha": _same("smoothing_alpha"),
        "use_epass": ("decision", "(one projector)", "EPASS is not implemented"),
    },
    "comatch": {
        **COMMON,
        "use_cat": _same("teacher", lambda value: "online" if _bool(value) else "separate forwards"),
        "hard_label": _same("(soft pseudo-labels)", lambda value: "(soft pseudo-labels)"),
        "epoch": ("decision", "smoothing_start_epoch", "USB's epoch is 1,024 iterations"),
        "T": _same("temperature", float),
        "contrast_p_cutoff": _same("contrast_threshold"),
        "contrast_loss_ratio": _same("lambda_c"),
        "proj_size": _same("projection_dim"),
        "queue_batch": _same("queue_batch"),
        "smoothing_alpha": _same("alpha"),
        "da_len": _same("da_len"),
        "use_epass": ("decision", "(one projector)", "EPASS is not implemented"),
    },
}

# A "same" rule whose key is in parentheses names a behaviour of ours that no recipe key states (it
# is fixed in the code); its convert returns that same text when USB's value is that behaviour.


# ------------------------------------------------------------------------------------------ reading
def read_originals(src: Path) -> dict:
    import yaml

    originals = {}
    for algorithm in ALGORITHMS:
        folder = src / "config" / "classic_cv" / algorithm
        files = sorted(folder.glob(f"{algorithm}_cifar10_*_0.yaml"))
        if not files:
            raise SystemExit(f"{folder}: no {algorithm}_cifar10_*_0.yaml (is {src} a USB checkout?)")
        for path in files:
            labels = path.stem.split("_")[2]
            originals.setdefault(algorithm, {})[labels] = yaml.safe_load(path.read_text())
    defaults = {}
    for file, pattern, name in CODE_DEFAULTS:
        match = re.search(pattern, (src / file).read_text())
        if not match:
            raise SystemExit(f"{src / file}: {name} not found (pattern {pattern!r}); update CODE_DEFAULTS")
        value = match.group(1)
        defaults[name] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    return {"source": "microsoft/Semi-supervised-learning", "configs": originals, "code_defaults": defaults}


def our_recipe(algorithm: str, labels: str) -> dict | None:
    """The resolved recipe (``extends`` applied) plus the method's defaults for keys it does not set."""
    path = ROOT / "recipes" / f"{algorithm}_cifar10_{labels}.yaml"
    if not path.is_file():
        return None
    sys.path.insert(0, str(ROOT))
    from modeling_stil.methods import get_method_class
    from modeling_stil.training.recipe_reading import load_recipe

    recipe = load_recipe(path)
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(get_method_class(algorithm).arguments_class)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **recipe}


def compare(algorithm: str, usb: dict, code_defaults: dict, ours: dict) -> list[tuple]:
    """Rows (usb key, usb value, our key, our value, status): same | differs | decision | plumbing | unmapped."""
    rules = RULES[algorithm]
    rows = []
    for key, value in {**usb, **code_defaults}.items():
        if key in PLUMBING:
            rows.append((key, value, "", "", "plumbing"))
            continue
        rule = rules.get(key)
        if rule is None:
            rows.append((key, value, "?", "", "unmapped"))
            continue
        if rule[0] == "decision":
            rows.append((key, value, rule[1], _our_value(ours, rule[1]), "decision: " + rule[2]))
            continue
        _, our_key, convert = rule
        expected = convert(value)
        actual = our_key if our_key.startswith("(") else _our_value(ours, our_key)
        status = "same" if _equal(actual, expected) else "differs"
        rows.append((key, value, our_key, actual, status))
    return rows


def _our_value(ours: dict, key: str):
    if "/" in key:
        return "/".join(str(ours.get(part, "-")) for part in key.split("/"))
    return ours.get(key, "(not set)") if not key.startswith("(") else ""


def _equal(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"re-read USB's configs from $USB_ORIGINAL_SRC into {ORIGINALS_JSON.name}")
    args = parser.parse_args(argv)
    if args.write:
        import os

        src = os.environ.get("USB_ORIGINAL_SRC")
        if not src:
            raise SystemExit("set USB_ORIGINAL_SRC to a checkout of microsoft/Semi-supervised-learning")
        ORIGINALS_JSON.parent.mkdir(parents=True, exist_ok=True)
        ORIGINALS_JSON.write_text(json.dumps(read_originals(Path(src)), indent=1, sort_keys=True) + "\n")
        print(f"wrote {ORIGINALS_JSON.relative_to(ROOT)}")
    originals = json.loads(ORIGINALS_JSON.read_text())
    for algorithm, by_labels in originals["configs"].items():
        for labels, usb in sorted(by_labels.items(), key=lambda item: int(item[0])):
            ours = our_recipe(algorithm, labels)
            title = f"{algorithm} CIFAR-10 {labels} labels: USB config/classic_cv/{algorithm}/{algorithm}_cifar10_{labels}_0.yaml"
            if ours is None:
                print(f"\n{title}\n  no recipe recipes/{algorithm}_cifar10_{labels}.yaml")
                continue
            print(f"\n{title}  vs  recipes/{algorithm}_cifar10_{labels}.yaml")
            print(f"  {'USB key':22} {'USB value':28} {'our key':42} {'our value':28} status")
            for key, value, our_key, our_value, status in compare(algorithm, usb, originals["code_defaults"], ours):
                print(f"  {key:22} {value!s:28.28} {our_key:42.42} {our_value!s:28.28} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
