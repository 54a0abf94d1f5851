#!/usr/bin/env python
"""Our Learning-to-Impute recipes side by side with the original scripts' values.

    L2I_ORIGINAL_SRC=<WeiHongLee/Learning-to-impute> python scripts/golden/compare_l2i_recipes.py --write
        reads the checkout (each script's argparse defaults, loaded as gen_l2i.py loads it, and the
        values its code hard-codes, each checked to be in the source) and writes
        tests/golden/l2i_original_recipes.json
    python scripts/golden/compare_l2i_recipes.py
        prints every recipe value next to the original's (from that JSON; no checkout needed)

Families: mean_teacher / mixmatch / l2i_o / l2i_l on CIFAR-10 (``Classification/train-*.py``) and
mean_teacher / pseudo_label / l2i_o / l2i_l on AFLW (``Regression/train-*.py``). The label budget
(``--n-labeled``, our dataset / ``labeled_fraction``) is the experiment variable and is not compared.
``pseudo_label`` on CIFAR-10 has no original (the L2I code has no classification PL script).
A value that differs must be listed in DOCUMENTED with its reason (tests/test_golden_l2i_recipes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
JSON_PATH = ROOT / "tests" / "golden" / "l2i_original_recipes.json"

SCRIPTS = {
    ("mean_teacher", "cifar10"): "Classification/train-MT.py",
    ("mixmatch", "cifar10"): "Classification/train-MM.py",
    ("l2i_o", "cifar10"): "Classification/train-L2I-O.py",
    ("l2i_l", "cifar10"): "Classification/train-L2I-L.py",
    ("mean_teacher", "aflw"): "Regression/train-MT.py",
    ("pseudo_label", "aflw"): "Regression/train-PL.py",
    ("l2i_o", "aflw"): "Regression/train-L2I-O.py",
    ("l2i_l", "aflw"): "Regression/train-L2I-L.py",
}
LABEL_BUDGETS = {"cifar10": (250, 500, 1000, 2000, 4000), "aflw": ("1pct", "5pct", "10pct", "100pct")}

# (method, dataset, field) -> why our recipe differs from the original (docs/methods.md says the same)
DOCUMENTED = {
    (m, "cifar10", "per_device_eval_batch_size"): "evaluation batch size (eval mode: no effect on the metrics); 256 is faster"
    for m in ("mean_teacher", "mixmatch", "l2i_o", "l2i_l")
}


# ------------------------------------------------------------------------------------- originals
def _active(source: str, snippet: str) -> bool:
    """``snippet`` appears on a line that is not commented out."""
    return any(snippet in line and not line.lstrip().startswith("#") for line in source.splitlines())


def _need(source: str, snippet: str, file: str) -> str:
    if not _active(source, snippet):
        raise SystemExit(f"{file}: expected code {snippet!r} not found; the checkout differs from the one these values were read from")
    return snippet


def original_values(method: str, dataset: str) -> dict:
    """{field: [value, where it comes from]} for one original script."""
    from gen_l2i import original_script

    file = SCRIPTS[(method, dataset)]
    folder, script = file.split("/")
    source = (Path(os.environ["L2I_ORIGINAL_SRC"]) / file).read_text()
    with original_script(folder, script, []) as module:
        a = module.args
    need = lambda snippet: _need(source, snippet, file)
    v: dict[str, list] = {}
    v["per_device_train_batch_size"] = [a.batch_size, "--batch-size"]
    v["mu"] = [1, need("unlabeled_trainloader = data.DataLoader(train_unlabeled_set, batch_size=args.batch_size")
               if dataset == "cifar10" else need("batch_sampler_u = BatchSampler(sampler_u, args.batch_size")]
    v["per_device_eval_batch_size"] = [a.batch_size, need("val_loader = data.DataLoader(val_set, batch_size=args.batch_size")]
    v["max_steps"] = [a.epochs * a.val_iteration, "--epochs x --val-iteration"]
    v["eval_steps"] = [a.val_iteration, "validation once per epoch of --val-iteration steps"]
    v["learning_rate"] = [a.lr, "--lr"]
    v["seed"] = [a.manualSeed, "--manualSeed"]
    v["max_grad_norm"] = [None, "no clip_grad in the script"] if "clip_grad" not in source else [True, "clip_grad"]
    v["eval_ema_decay"] = [a.ema_decay, need("WeightEMA(model, ema_model, alpha=args.ema_decay)")]
    if dataset == "cifar10":
        v["optimizer"] = ["adam", need("optimizer = optim.Adam(model.parameters(), lr=args.lr)")]
        v["weight_decay"] = [0.0, "optim.Adam without weight_decay"]
        v["adam_beta1"], v["adam_beta2"] = [0.9, "torch Adam default"], [0.999, "torch Adam default"]
        v["lr_scheduler"] = ["constant", "no active scheduler.step()"] if not _active(source, "scheduler.step()") else [None, "?"]
        v["student_weight_decay"] = [0.02, need("self.wd = 0.02 * args.lr") + " / " + need("param.data.mul_(1 - self.wd)")]
        v["evaluate"] = ["ema", need("validate(val_loader, ema_model, criterion")]
        v["metric_for_best_model"] = ["accuracy", need("is_best = val_acc > best_acc")]
    else:
        v["optimizer"] = ["sgd", need("optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)")]
        v["momentum"], v["nesterov"], v["weight_decay"] = [0.9, "optim.SGD"], [False, "optim.SGD"], [5e-4, "optim.SGD"]
        need("if (epoch + 1) % 100 == 0")
        v["lr_scheduler"] = ["multistep", "lr x 0.1 when (epoch + 1) % 100 == 0"]
        v["lr_milestones"] = [[99 * a.val_iteration], "start of epoch 99 (0-indexed) of --val-iteration steps"]
        v["lr_gamma"] = [0.1, need("optimizer.param_groups[0]['lr'] *= 0.1")]
        v["standardize_targets"] = [True, need("targets_x = (targets_x - mean) / std")]
        v["unlabeled_includes_labeled"] = [True, "train_unlabeled_set = the whole training list (dataset/aflw.py)"]
        v["student_weight_decay"] = [0.0, "WeightEMA's student decay line is commented out"]
        assert not _active(source, "param.data.mul_(1 - self.wd)"), file
        v["evaluate"] = ["ema" if _active(source, "validate(val_loader, ema_model") else "student",
                         "the network validate() is given"]
        v["metric_for_best_model"] = ["nme", need("is_best = val_me < best_acc")]
    if method == "mixmatch":
        v["lambda_u"] = [a.lambda_u, "--lambda-u"]
        v["temperature"], v["alpha"] = [a.T, "--T"], [a.alpha, "--alpha"]
        v["rampup_fraction"] = [1.0 / a.batch_size, need("rampup_length = float(args.epochs) / float(args.batch_size)")]
        return v
    v["lambda_u"] = [a.lambda_u, "--lambda-u"]
    v["rampup"] = ["linear", "linear_rampup: np.clip(current / rampup_length, 0, 1)"]
    v["rampup_fraction"] = [0.4, need("rampup_length = float(args.epochs) * 0.4") if dataset == "cifar10"
                            else need("args.epochs * args.val_iteration * 0.4")]
    if method != "pseudo_label":
        v["ema_decay"] = [a.ema_decay, need("UpdateEma(model, target_model, alpha=args.ema_decay)")]
        v["teacher_train_mode"] = [True, "target_model is never put in eval()"]
        v["interleave"] = [True, "interleaved labelled / unlabelled forwards"]
    if method.startswith("l2i"):
        if dataset == "cifar10":
            multiplier = 50.0 if method == "l2i_o" else 100.0
            v["inner_lr_multiplier"] = [multiplier, need(f"val.detach() - {int(multiplier)} * args.lr * grad")]
            v["inner_reduction"] = ["sum", need("Lu_tmp = torch.sum((probs_u - targets_u) ** 2)")]
            v["squash"] = [False, "no tanh"]
        else:
            multiplier = 10.0 if method == "l2i_o" else 1.0
            v["inner_lr_multiplier"] = [multiplier, need(f"tmp_lr = {multiplier if method == 'l2i_l' else 10} * optimizer.param_groups[0]['lr']")]
            v["inner_reduction"] = ["mean", "Lu_tmp = (...).mean()"]
            squash = _active(source, "torch.tanh(logits_u) - torch.tanh(targets_u)")
            v["squash"] = [squash, "tanh on both sides of Lu_tmp" if squash else "no tanh"]
        steps = len(re.findall(r"^\s*ema_optimizer\.step\(\)", source, flags=re.MULTILINE))
        v["eval_ema_each_phase"] = [steps == 2, f"{steps} ema_optimizer.step() per iteration"]
        v["meta_updates_bn_stats"] = [True, "the meta step's student forward is a real train-mode forward"]
        if method == "l2i_l":
            need("p.data += -1 * p_grad" if dataset == "aflw" else "p.data += - 1 * p_grad")
            v["label_step"] = [1.0, "p.data += -1 * p_grad"]
            v["extra_weight"] = [1.0, need("Lu.backward()")]
            v["label_memory"] = [False, "labels re-initialised every iteration"]
    return v


def write_json() -> dict:
    table = {f"{m}/{d}": {"file": f, "values": original_values(m, d)} for (m, d), f in SCRIPTS.items()}
    JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
    JSON_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


# ------------------------------------------------------------------------------------- ours
def recipe_paths(method: str, dataset: str) -> list[Path]:
    return [ROOT / "recipes" / f"{method}_{dataset}_{budget}.yaml" for budget in LABEL_BUDGETS[dataset]]


def our_values(path: Path) -> dict:
    """Every compared field of a recipe as the run resolves it (recipe, then the arguments'
    defaults, then the method's per-task resolution of None)."""
    from modeling_stil.training.arguments import parse_run_arguments

    run = parse_run_arguments([str(path)])
    task = "classification" if "cifar10" in path.name else "landmarks"
    merged = {}
    for group in (run.data, run.model, run.training, run.method):
        merged.update(vars(group))
    m = run.method
    from modeling_stil.methods.base import get_method_class
    from modeling_stil.training.selection import selection_rule

    # what the trainer selects the best model by, and which network MixMatch / PL evaluate (no `evaluate` key)
    merged["metric_for_best_model"] = selection_rule(get_method_class(path.name.split("_cifar10")[0].split("_aflw")[0]), run.training, task, 10)[0]
    if not hasattr(run.method, "evaluate"):
        merged["evaluate"] = "ema" if getattr(run.method, "eval_ema_decay", 0) > 0 else "student"
    for name, resolve in (("lambda_u", "resolved_lambda_u"), ("student_weight_decay", "resolved_student_weight_decay"),
                          ("inner_lr_multiplier", "resolved_multiplier"), ("inner_reduction", "resolved_reduction"),
                          ("squash", "resolved_squash"), ("eval_ema_each_phase", "resolved_eval_ema_each_phase")):
        if hasattr(m, resolve):
            merged[name] = getattr(m, resolve)(task)
    return merged


def _same(ours, theirs) -> bool:
    if isinstance(theirs, list) or isinstance(ours, (list, tuple)):
        return [float(x) for x in (ours or [])] == [float(x) for x in (theirs or [])]
    if isinstance(theirs, bool) or theirs is None or isinstance(theirs, str):
        return ours == theirs
    return ours is not None and abs(float(ours) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs)))


def comparisons(table: dict | None = None):
    """(recipe, field, ours, original, source, same, documented reason or None) for every recipe."""
    table = table or json.loads(JSON_PATH.read_text())
    rows = []
    for key, entry in table.items():
        method, dataset = key.split("/")
        for path in recipe_paths(method, dataset):
            ours = our_values(path)
            for field, (value, source) in sorted(entry["values"].items()):
                mine = ours.get(field, "<missing>")
                rows.append((path.name, field, mine, value, source, _same(mine, value), DOCUMENTED.get((method, dataset, field))))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="read the checkout (L2I_ORIGINAL_SRC) and write the JSON")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(HERE), str(ROOT)]
    table = None
    if args.write:
        if not os.environ.get("L2I_ORIGINAL_SRC"):
            raise SystemExit("set L2I_ORIGINAL_SRC to a checkout of WeiHongLee/Learning-to-impute")
        table = write_json()
        print(f"wrote {JSON_PATH.relative_to(ROOT)}")
    print(f"{'recipe':34s} {'field':28s} {'ours':>14s} {'original':>14s}  status")
    for recipe, field, mine, value, source, same, reason in comparisons(table):
        status = "same" if same else f"DIFFERS ({reason})" if reason else "DIFFERS, undocumented"
        print(f"{recipe:34s} {field:28s} {mine!s:>14s} {value!s:>14s}  {status}   [{source}]")
    print("pseudo_label_cifar10_*.yaml: no original (the L2I code has no classification pseudo-labelling script)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
