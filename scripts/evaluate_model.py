#!/usr/bin/env python
"""Evaluate a saved stil model on a split of a stil dataset and print the metrics as JSON.

    python scripts/evaluate_model.py --model runs/default --dataset DATASET_DIR --split test [--write]

``--model``: an exported folder or a Hub id; ``--dataset``: a stil dataset folder or Hub dataset id.
With ``--write`` the metrics are added to ``eval_results.json`` next to the model (local folders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def evaluate_model(model, dataset_dict, metadata, schema, split: str, batch_size: int = 128, max_samples: int | None = None,
                   device: str | None = None) -> dict:
    import torch

    from data_utils.loaders import build_eval_loader
    from data_utils.views import ViewConfig
    from modeling_stil.training.metrics import compute_metrics
    from modeling_stil.training.batches import split_eval_batch

    if split not in dataset_dict:
        raise SystemExit(f"evaluate_model.py: the dataset has no {split!r} split; splits: {sorted(dataset_dict)}")
    if max_samples is not None and len(dataset_dict[split]) > max_samples:
        dataset_dict = dataset_dict.copy()
        dataset_dict[split] = dataset_dict[split].select(range(max_samples))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    view_config = ViewConfig.from_model_config(model.config)
    loader = build_eval_loader(dataset_dict, metadata, schema, split, batch_size, view_config)
    model = model.to(device).eval()
    predictions, references = [], []
    with torch.no_grad():
        for batch in loader:
            inputs, labels = split_eval_batch(batch)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            predictions.append(model(**inputs).logits.float().cpu())
            references.append(labels.cpu())
    metrics = compute_metrics(metadata.task, torch.cat(predictions), torch.cat(references), metadata.num_labels)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["num_samples"] = int(sum(len(r) for r in references))
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id")
    parser.add_argument("--dataset", required=True, help="stil dataset folder or Hub dataset id")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--write", action="store_true", help="add the metrics to eval_results.json next to the model")
    args = parser.parse_args(argv)

    import torch

    from data_utils.io import load_dataset
    from modeling_stil.presets import load_saved_model

    try:
        model = load_saved_model(args.model, dtype=torch.float32)
    except ValueError as error:
        print(f"evaluate_model.py: cannot load model {args.model!r}: {error}", file=sys.stderr)
        return 1
    try:
        dataset_dict, metadata, schema = load_dataset(args.dataset)
    except FileNotFoundError as error:
        print(f"evaluate_model.py: {error}", file=sys.stderr)
        return 1
    check = getattr(model, "check_data_compatibility", None)
    if check is not None:
        try:
            check(schema, metadata)
        except ValueError as error:
            print(f"evaluate_model.py: the model does not fit this dataset: {error}", file=sys.stderr)
            return 1
    metrics = evaluate_model(model, dataset_dict, metadata, schema, args.split, args.batch_size, args.max_samples, args.device)
    print(json.dumps(metrics))
    if args.write:
        folder = Path(args.model)
        if not folder.is_dir():
            print("evaluate_model.py: --write needs a local model folder", file=sys.stderr)
            return 1
        path = folder / "eval_results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        results.setdefault("evaluations", {})[f"{Path(args.dataset).name}:{args.split}"] = metrics
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
