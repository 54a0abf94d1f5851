#!/usr/bin/env python
"""Print exported runs side by side: the test metrics of each model selected on validation, and what
a TIP pretraining run learnt. The last step of `make train`.

    python scripts/compare_runs.py "supervised multimodal=runs/supervised_synthetic_1pct" \\
        "TIP fine-tuning=runs/tip_finetune_synthetic" "STiL=runs/stil_synthetic" --pretrain runs/tip_synthetic

Each ``LABEL=RUN_DIR`` names an exported run (its ``eval_results.json``); ``--pretrain`` a
``tip_pretrain`` run, whose validation contrastive loss is printed beside its chance level. Runs must
have been trained on the same dataset (checked: the dataset recorded in each run must be the same).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_results(run_dir: str) -> dict:
    path = Path(run_dir) / "eval_results.json"
    if not path.is_file():
        raise SystemExit(f"compare_runs.py: {path} does not exist; train and export that run first (export: true)")
    return json.loads(path.read_text())


def contrastive_chance(num_rows: int, batch_size: int) -> float:
    """Mean over rows of log(size of the row's batch): the contrastive loss of embeddings that say
    nothing about which row is which (the last batch of a split is smaller)."""
    full, rest = divmod(num_rows, batch_size)
    return (full * batch_size * math.log(batch_size) + (rest * math.log(rest) if rest else 0.0)) / num_rows


def run_config(run_dir: str) -> dict:
    import yaml

    path = Path(run_dir) / "run_config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR of exported runs, printed in this order")
    parser.add_argument("--pretrain", default=None, help="a tip_pretrain run: its validation contrastive loss")
    parser.add_argument("--metric", default="accuracy", help="the test metric to print (default accuracy)")
    args = parser.parse_args(argv)

    rows, datasets, labelled = [], set(), set()
    for spec in args.runs:
        if "=" not in spec:
            raise SystemExit(f"compare_runs.py: {spec!r} is not LABEL=RUN_DIR")
        label, run_dir = spec.split("=", 1)
        results = read_results(run_dir)
        test = results.get("test") or {}
        if args.metric not in test:
            raise SystemExit(f"compare_runs.py: {run_dir} has no test {args.metric!r}; its test metrics: {sorted(test)}")
        datasets.add(json.dumps(results.get("dataset"), sort_keys=True, default=str))
        info_path = Path(run_dir) / "run_info.json"
        if info_path.is_file():
            labelled.add(tuple(json.loads(info_path.read_text()).get("labeled_indices") or ()))
        rows.append((label, run_dir, results.get("method"), results.get("best_step"), test[args.metric],
                     (results.get("validation") or {}).get(args.metric)))
    if len(datasets) > 1:
        raise SystemExit("compare_runs.py: the runs were trained on different datasets; compare runs of one dataset")
    if len(labelled) > 1:
        raise SystemExit("compare_runs.py: the runs used different labelled rows (labeled_indices in run_info.json); "
                         "give them the same labeled_fraction and seed")
    print(f"\n{'model':<34} {'method':<14} {'best step':>9} {'val ' + args.metric:>14} {'test ' + args.metric:>14}")
    for label, run_dir, method, step, test_value, val_value in rows:
        val = f"{val_value:.3f}" if isinstance(val_value, (int, float)) else "-"
        print(f"{label:<34} {str(method):<14} {str(step):>9} {val:>14} {test_value:>14.3f}")
    best = max(rows, key=lambda r: r[4])
    count = len(next(iter(labelled))) if labelled else None
    print(f"best on test: {best[0]} ({best[4]:.3f}); every model selected on validation, tested once"
          + (f"; all trained on the same {count} labelled rows" if count else ""))

    if args.pretrain:
        results = read_results(args.pretrain)
        validation = results.get("validation") or {}
        config = run_config(args.pretrain)
        itc = validation.get("loss_itc")
        if itc is not None:
            batch = int(config.get("per_device_eval_batch_size") or 256)
            rows_ = int(validation.get("num_samples") or 0)
            chance = contrastive_chance(rows_, batch) if rows_ else math.log(batch)
            print(f"TIP pretraining ({args.pretrain}): validation contrastive loss {itc:.3f} "
                  f"(chance, log of the batch size: {chance:.3f}), matching loss {validation.get('loss_itm', float('nan')):.3f}, "
                  f"masked-table reconstruction {validation.get('loss_mtr', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
