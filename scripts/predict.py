#!/usr/bin/env python
"""Predict with a saved stil model on raw rows.

    python scripts/predict.py --model DIR --table rows.csv [--images-root DIR] [--top-k K]
                              [--output out.jsonl] [--batch-size N] [--device cpu|cuda]

DIR is a folder written by ``save_pretrained`` (model + ``processor_config.json``; without the
processor file the settings are read from config.json). The table (CSV, or .parquet/.jsonl) has one
row per sample with RAW values: the image path in the column named like the dataset's image column
(``image`` by default; relative paths are resolved against --images-root, else the table's folder),
one column per tabular field (category strings, raw numbers; empty cell = missing). Other columns
are ignored. Prints one line per row (top-k class names with probabilities, or the regression
values) and, with --output, writes one JSON object per row.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if suffix in (".jsonl", ".json"):
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        return [{k: (None if v != v else v) for k, v in row.items()} for row in frame.to_dict("records")]
    raise SystemExit(f"unsupported table format {suffix!r}: use .csv, .jsonl or .parquet")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder (or Hub id)")
    parser.add_argument("--table", required=True, type=Path, help="raw rows: .csv, .jsonl or .parquet")
    parser.add_argument("--images-root", type=Path, default=None, help="folder relative image paths start from")
    parser.add_argument("--image-column", default=None, help="image path column (default: the processor's, 'image')")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="write predictions as JSON lines")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModel

    import modeling_stil  # noqa: F401  (registers our model classes)
    from modeling_stil.processing_stil import StilProcessor

    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    processor = StilProcessor.from_pretrained(args.model)
    rows = read_table(args.table)
    if not rows:
        raise SystemExit(f"{args.table} has no rows")
    image_column = args.image_column or processor.image_column
    uses_images = processor.image_size is not None
    uses_tabular = processor.tabular_schema is not None
    images_root = args.images_root or args.table.resolve().parent
    if uses_images and image_column not in rows[0]:
        raise SystemExit(
            f"the model needs images but {args.table} has no {image_column!r} column (columns: {sorted(rows[0])}); "
            "pass --image-column"
        )
    if uses_tabular:
        absent = [n for n in processor.schema.names if n not in rows[0]]
        if absent:
            print(f"warning: columns {absent} are absent from the table; treating them as missing", file=sys.stderr)
    id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
    problem_type = model.config.problem_type
    out_handle = args.output.open("w") if args.output else None
    try:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            kwargs = {}
            if uses_images:
                paths = []
                for i, row in enumerate(batch):
                    value = row.get(image_column)
                    if not value:
                        raise SystemExit(f"row {start + i}: empty {image_column!r} cell; the model needs an image")
                    path = Path(value)
                    paths.append(path if path.is_absolute() else images_root / path)
                missing = [str(p) for p in paths if not p.is_file()]
                if missing:
                    raise SystemExit(f"image file(s) not found: {missing[:5]} (check --images-root)")
                kwargs["images"] = paths
            if uses_tabular:
                kwargs["tabular"] = batch
            inputs = {k: v.to(args.device) for k, v in processor(**kwargs).items()}
            with torch.no_grad():
                output = model(**inputs)
            logits = getattr(output, "logits", None)
            if logits is None:
                raise SystemExit(f"{type(model).__name__} has no prediction head (no logits); fine-tune it first")
            predictions = processor.postprocess(logits, top_k=args.top_k, id2label=id2label, problem_type=problem_type)
            for i, prediction in enumerate(predictions):
                index = start + i
                if problem_type == "regression":
                    text = ", ".join(f"{v:.4f}" for v in prediction)
                    record = {"row": index, "values": prediction}
                else:
                    text = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in prediction)
                    record = {"row": index, "predictions": prediction}
                print(f"row {index}: {text}")
                if out_handle:
                    out_handle.write(json.dumps(record) + "\n")
    finally:
        if out_handle:
            out_handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
