#!/usr/bin/env python
"""Turn a table (CSV/parquet) plus image files into a stil dataset folder.

Example::

    python scripts/prepare_dataset.py --table data/cars.csv --image-column path --label-column model \
        --categorical color,body --continuous length,price --val-fraction 0.1 --test-fraction 0.2 \
        --labeled-fraction 0.1 --seed 0 --output datasets/cars

Streaming (data larger than a disk, docs/data.md "Streaming"): ``--streaming-shards N`` writes the
dataset as N Parquet shards per training group (labelled, unlabelled) plus the layout file
``train.py --streaming`` reads, to a folder or any fsspec URL; ``--convert FOLDER`` does so for an
existing dataset folder instead of a table::

    python scripts/prepare_dataset.py --convert datasets/cars --streaming-shards 64 --output s3://bucket/cars-shards

Image paths are relative to the table's folder. Vocabularies and continuous statistics come from
the train split only; missing cells stay null. On bad input the script prints one ``error: ...``
line naming the file/row/column and the fix, exits with code 2, and writes nothing.
See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.builders._common import add_output_arguments, run_cli, split_list  # noqa: E402
from data_utils.builders.table import build_from_table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", help="CSV or parquet file, one row per sample")
    source.add_argument("--convert", metavar="DATASET",
                        help="an existing dataset folder to write as streaming shards (needs --streaming-shards)")
    parser.add_argument("--image-column", help="column with image paths (relative to the table); needed with --table")
    parser.add_argument("--label-column", help="needed with --table")
    parser.add_argument("--streaming-shards", type=int, metavar="N",
                        help="write N Parquet shards per training group (labelled, unlabelled) for train.py --streaming "
                             "(a multiple of processes x DataLoader workers); --output may be an fsspec URL")
    parser.add_argument("--categorical", help="comma-separated categorical columns")
    parser.add_argument("--continuous", help="comma-separated continuous columns")
    parser.add_argument("--schema", help="reuse an existing tabular_schema.json (file or dataset folder)")
    parser.add_argument("--id-column", help="optional id column; duplicated ids are refused")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--split-column", help="column holding train/validation/test per row")
    split.add_argument("--val-fraction", type=float, default=None, help="default 0.1 (stratified for classification)")
    parser.add_argument("--test-fraction", type=float, default=None, help="default 0.1")
    labeled = parser.add_mutually_exclusive_group()
    labeled.add_argument("--labeled-column", help="boolean column: train rows that keep their label")
    labeled.add_argument("--labeled-fraction", type=float, help="stratified fraction of train rows kept labelled")
    labeled.add_argument("--labeled-per-class", type=int, help="labelled train rows per class")
    parser.add_argument("--label-names", help="comma-separated class names (classification); default: train labels")
    parser.add_argument("--task", choices=["classification", "regression"], default="classification")
    parser.add_argument("--seed", type=int, default=0)
    missing = parser.add_mutually_exclusive_group()
    missing.add_argument("--allow-missing", dest="allow_missing", action="store_true", default=None,
                         help="keep empty cells as nulls (default, or the --schema's setting)")
    missing.add_argument("--no-missing", dest="allow_missing", action="store_false",
                         help="refuse empty/NaN tabular cells")
    parser.add_argument("--vocabulary-from", choices=["train", "all"], default="train",
                        help="categories from the train split only (default) or from every split")
    parser.add_argument("--image-mode", choices=["RGB", "L", "keep"], default="RGB",
                        help="convert images to this mode (original bytes kept when already in it)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.table and not (args.image_column and args.label_column):
        parser.error("--table needs --image-column and --label-column")
    if args.convert and args.streaming_shards is None:
        parser.error("--convert writes streaming shards: give --streaming-shards N")
    if args.streaming_shards is not None and args.streaming_shards < 1:
        parser.error(f"--streaming-shards must be >= 1, got {args.streaming_shards}")
    if args.split_column and args.test_fraction is not None:
        parser.error("--test-fraction cannot be combined with --split-column")
    return args


def write_shards(dataset_folder, args) -> str:
    """The dataset folder as streaming shards at ``args.output`` (data_utils.streaming)."""
    from data_utils.builders._common import BuildError
    from data_utils.io import DatasetError, load_dataset
    from data_utils.streaming import write_streaming_shards

    try:
        dataset_dict, metadata, schema = load_dataset(dataset_folder)
        return write_streaming_shards(dataset_dict, metadata, schema, args.output, args.streaming_shards,
                                      seed=args.seed, overwrite=args.overwrite)
    except DatasetError as error:  # one error line (run_cli), not a traceback
        raise BuildError(str(error)) from None


def main(argv=None):
    args = parse_args(argv)
    if args.convert:
        path = write_shards(args.convert, args)
        print(f"wrote {path}")
        return path
    if args.streaming_shards is not None:  # build the map-style folder aside, then shard it
        import tempfile

        with tempfile.TemporaryDirectory() as staging:
            built = build(args, Path(staging) / "dataset")
            path = write_shards(built, args)
        print(f"wrote {path}")
        return path
    path = build(args, args.output)
    print(f"wrote {path}")
    return path


def build(args, output):
    return build_from_table(
        args.table, output,
        image_column=args.image_column, label_column=args.label_column,
        categorical=split_list(args.categorical), continuous=split_list(args.continuous), schema=args.schema,
        split_column=args.split_column,
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        test_fraction=0.1 if args.test_fraction is None else args.test_fraction,
        labeled_column=args.labeled_column, labeled_fraction=args.labeled_fraction,
        labeled_per_class=args.labeled_per_class, task=args.task, seed=args.seed,
        allow_missing=args.allow_missing, id_column=args.id_column, label_names=split_list(args.label_names),
        vocabulary_from=args.vocabulary_from, image_mode=None if args.image_mode == "keep" else args.image_mode,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
