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

A bad row does not stop the others: every good row is predicted; a bad row (missing or unreadable
image file, non-numeric value, unseen category) is reported as ``row N: error: column C: reason``
(and as ``{"row": N, "error": {"column": C, "reason": ...}}`` in --output), and a summary line ends
the run. Rows are numbered from 0 in table order. ``--unknown-category missing`` treats a category the
model never saw as a missing cell (reported as a warning on that row); the default, ``error``, fails
that row. Exit status: 0 every row predicted, 1 at least one row failed, 2 bad arguments or model.
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


def fatal(message: str):
    """Bad arguments, table or model: one line, exit status 2."""
    print(f"predict.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        fatal(f"unsupported table format {suffix!r}: use .csv, .jsonl or .parquet")
    if not path.is_file():
        fatal(f"--table {path}: {'is a folder, not a table' if path.is_dir() else 'no such file'}")
    try:
        if suffix == ".csv":
            with path.open(newline="") as handle:
                return [dict(row) for row in csv.DictReader(handle)]
        if suffix in (".jsonl", ".json"):
            lines = path.read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        import pandas as pd

        frame = pd.read_parquet(path)
        return [{k: (None if v != v else v) for k, v in row.items()} for row in frame.to_dict("records")]
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:  # unreadable or malformed file
        fatal(f"cannot read --table {path}: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")


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
    parser.add_argument("--unknown-category", choices=["error", "missing"], default="error",
                        help="a category the model never saw: fail that row (default) or treat the cell as missing")
    return parser.parse_args(argv)


class RowError(ValueError):
    def __init__(self, column: str | None, reason: str):
        super().__init__(reason)
        self.column = column
        self.reason = reason


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and value.strip() == "")


def check_row(row: dict, processor, *, uses_images: bool, uses_tabular: bool, image_column: str, images_root: Path,
              unknown_category: str) -> tuple[dict, Path | None, list[str]]:
    """Validate one raw row: -> (row to encode, image path, warnings), or raise `RowError`."""
    from PIL import Image

    warnings: list[str] = []
    path = None
    if uses_images:
        value = row.get(image_column)
        if _missing(value):
            raise RowError(image_column, "empty cell; the model needs an image")
        path = Path(str(value))
        path = path if path.is_absolute() else images_root / path
        if not path.is_file():
            raise RowError(image_column, f"image file {path} not found (check --images-root)")
        from data_utils.images import ImageDepthError, to_8bit

        try:
            with Image.open(path) as handle:
                handle.load()
                to_8bit(handle)  # 16-bit is scaled later; a float image has no range to scale by
        except ImageDepthError as error:
            raise RowError(image_column, f"image {path}: {error}") from None
        except Exception as error:  # noqa: BLE001 -- PIL raises many types for an unreadable image
            raise RowError(image_column, f"cannot read image {path}: {type(error).__name__}: {error}") from None
    if uses_tabular:
        row = dict(row)
        for f in processor.schema.fields:
            value = row.get(f.name)
            if _missing(value):
                continue
            if f.kind == "categorical":
                label = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
                if label not in f.categories:
                    if unknown_category == "missing":
                        warnings.append(f"column {f.name!r}: unseen category {value!r} treated as missing")
                        row[f.name] = None
                    else:
                        raise RowError(f.name, f"unseen category {value!r} (known: {f.categories[:10]}"
                                               f"{' ...' if len(f.categories) > 10 else ''}); "
                                               "--unknown-category missing treats it as a missing cell")
            elif isinstance(value, str):
                text = value.strip()
                if text.lower() in ("nan", "na", "none", "null"):
                    continue
                try:
                    float(text)
                except ValueError:
                    raise RowError(f.name, f"non-numeric value {value!r} in a continuous column") from None
    return row, path, warnings


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from modeling_stil.presets import load_saved_model
    from modeling_stil.processing_stil import StilProcessor

    rows = read_table(args.table)  # a missing table is said before the model is loaded
    try:
        model = load_saved_model(args.model, dtype=torch.float32).to(args.device).eval()
    except ValueError as error:
        fatal(f"--model {args.model}: {error}")
    processor = StilProcessor.from_pretrained(args.model)
    if not rows:
        fatal(f"{args.table} has no rows")
    image_column = args.image_column or processor.image_column
    uses_images = processor.image_size is not None
    uses_tabular = processor.tabular_schema is not None
    images_root = args.images_root or args.table.resolve().parent
    if uses_images and image_column not in rows[0]:
        fatal(
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
    failed: list[int] = []
    predicted = 0

    def emit(record: dict, text: str) -> None:
        print(text)
        if out_handle:
            out_handle.write(json.dumps(record) + "\n")

    try:
        for start in range(0, len(rows), args.batch_size):
            good: list[tuple[int, dict, Path | None, list[str]]] = []
            for index in range(start, min(start + args.batch_size, len(rows))):
                try:
                    row, path, notes = check_row(
                        rows[index], processor, uses_images=uses_images, uses_tabular=uses_tabular,
                        image_column=image_column, images_root=images_root, unknown_category=args.unknown_category,
                    )
                except RowError as error:
                    failed.append(index)
                    emit({"row": index, "error": {"column": error.column, "reason": error.reason}},
                         f"row {index}: error: column {error.column!r}: {error.reason}")
                    continue
                good.append((index, row, path, notes))
            if not good:
                continue
            kwargs = {}
            if uses_images:
                kwargs["images"] = [path for _, _, path, _ in good]
            if uses_tabular:
                kwargs["tabular"] = [row for _, row, _, _ in good]
            inputs = {k: v.to(args.device) for k, v in processor(**kwargs).items()}
            with torch.no_grad():
                output = model(**inputs)
            logits = getattr(output, "logits", None)
            if logits is None:
                fatal(f"{type(model).__name__} has no prediction head (no logits); fine-tune it first")
            predictions = processor.postprocess(logits, top_k=args.top_k, id2label=id2label, problem_type=problem_type)
            for (index, _, _, notes), prediction in zip(good, predictions):
                if problem_type == "regression":
                    text = ", ".join(f"{v:.4f}" for v in prediction)
                    record = {"row": index, "values": prediction}
                else:
                    text = ", ".join(f"{p['label']} ({p['score']:.3f})" for p in prediction)
                    record = {"row": index, "predictions": prediction}
                if notes:
                    record["warnings"] = notes
                    text += "  [warning: " + "; ".join(notes) + "]"
                predicted += 1
                emit(record, f"row {index}: {text}")
    finally:
        if out_handle:
            out_handle.close()
    summary = f"predicted {predicted} of {len(rows)} rows; {len(failed)} failed"
    if failed:
        summary += f" (rows {', '.join(map(str, failed[:20]))}{' ...' if len(failed) > 20 else ''})"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
