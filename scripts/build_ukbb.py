#!/usr/bin/env python
"""Build a UK Biobank cardiac stil dataset from TIP's preprocessed files (CAD or Infarction).

    python scripts/build_ukbb.py --features-dir UKBB/final --target CAD --output datasets/ukbb-cad \
        [--balanced] [--labeled-subset 0.1|0.01] [--seed 2022] [--column-names names.txt] [--images-root DIR]

Tabular values are stored as given (TIP z-scored and imputed them); the float [0, 1] images become
RGB PNG (uint8 = round(x*255)). Errors print one ``error: ...`` line and exit 2. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.builders._common import BuildError, add_output_arguments, run_cli  # noqa: E402
from data_utils.builders.ukbb import build_ukbb  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features-dir", required=True)
    parser.add_argument("--target", choices=["CAD", "Infarction"], required=True)
    parser.add_argument("--balanced", action="store_true", help="TIP's balanced train set (val/test unchanged)")
    parser.add_argument("--labeled-subset", choices=["0.1", "0.01"])
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--column-names", help="text file, one column name per line (categorical first)")
    parser.add_argument("--images-root", help="folder holding <subject>/<file>.npy, replacing stored paths")
    add_output_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = None
    if args.column_names:
        file = Path(args.column_names)
        if not file.is_file():
            raise BuildError(f"--column-names {file} does not exist")
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    path = build_ukbb(args.features_dir, args.output, target=args.target, balanced=args.balanced,
                      labeled_subset=args.labeled_subset, seed=args.seed, column_names=names,
                      images_root=args.images_root, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
