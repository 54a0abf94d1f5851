#!/usr/bin/env python
"""Build the AFLW landmarks stil dataset from the IMM release folder (aflw_release-2).

    python scripts/build_aflw.py --aflw-root data/aflw_release-2 --labeled-fraction 0.01 --seed 0 \
        --output datasets/aflw-1pct

Labels: (x1, y1, ..., x5, y5) in pixels of the stored image; validation = the last round(0.1*N)
training entries. Errors print one ``error: ...`` line and exit 2. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.builders._common import add_output_arguments, run_cli  # noqa: E402
from data_utils.builders.aflw import build_aflw  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aflw-root", required=True)
    parser.add_argument("--labeled-fraction", type=float, help="fraction of training images labelled (default all)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = build_aflw(args.aflw_root, args.output, labeled_fraction=args.labeled_fraction, seed=args.seed,
                      overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
