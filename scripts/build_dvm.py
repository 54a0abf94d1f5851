#!/usr/bin/env python
"""Build the DVM-CAR stil dataset, from TIP's prepared files or from the raw DVM-CAR download.

From TIP's prepared ``features/`` folder (values stored as given: TIP already z-scored them)::

    python scripts/build_dvm.py prepared --features-dir DVM/features --output datasets/dvm \
        [--labeled-subset 0.01|0.1] [--labeled-source files|protocol] [--image-format auto|jpg|npy] \
        [--images-root DVM/resized_DVM]

From the raw download (tables_V2.0/ and resized_DVM/ under --dvm-root; raw values stored)::

    python scripts/build_dvm.py raw --dvm-root DVM --output datasets/dvm-raw [--labeled-subset 0.01|0.1] \
        [--min-population 100]

Errors print one ``error: ...`` line and exit with code 2; nothing is written. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.builders._common import add_output_arguments, run_cli  # noqa: E402
from data_utils.builders.dvm import build_dvm_prepared, build_dvm_raw  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    prepared = sub.add_parser("prepared", help="TIP's prepared features/ folder")
    prepared.add_argument("--features-dir", required=True)
    prepared.add_argument("--labeled-subset", choices=["0.1", "0.01"])
    prepared.add_argument("--labeled-source", choices=["files", "protocol"], default="files",
                          help="read the subset files (default) or recompute TIP's low-data protocol")
    prepared.add_argument("--image-format", choices=["auto", "jpg", "npy"], default="auto")
    prepared.add_argument("--images-root", help="folder replacing .../resized_DVM/ in the stored absolute paths")
    raw = sub.add_parser("raw", help="raw DVM-CAR download")
    raw.add_argument("--dvm-root", required=True)
    raw.add_argument("--labeled-subset", choices=["0.1", "0.01"])
    raw.add_argument("--min-population", type=int, default=100)
    raw.add_argument("--split-seed", type=int, default=2022)
    raw.add_argument("--jitter", type=int, default=50)
    raw.add_argument("--jitter-seed", type=int, default=2022)
    raw.add_argument("--low-data-seed", type=int, default=2023)
    for p in (prepared, raw):
        add_output_arguments(p)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.source == "prepared":
        path = build_dvm_prepared(args.features_dir, args.output, labeled_subset=args.labeled_subset,
                                  labeled_source=args.labeled_source, image_format=args.image_format,
                                  images_root=args.images_root, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    else:
        path = build_dvm_raw(args.dvm_root, args.output, min_population=args.min_population,
                             labeled_subset=args.labeled_subset, split_seed=args.split_seed, jitter=args.jitter,
                             jitter_seed=args.jitter_seed, low_data_seed=args.low_data_seed,
                             overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
