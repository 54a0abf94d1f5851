#!/usr/bin/env python
"""Build the CIFAR-10 stil dataset (image only) with the L2I/MixMatch labelled split.

    python scripts/build_cifar10.py --tarball cifar-10-python.tar.gz --num-labeled 250 --seed 0 \
        --output datasets/cifar10-250 [--val-per-class 500]

Per class: num_labeled/10 labelled, the last 500 shuffled indices are validation, the rest
unlabelled; test = the official 10,000. Errors print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_utils.builders._common import add_output_arguments, run_cli  # noqa: E402
from data_utils.builders.cifar10 import build_cifar10  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", required=True, help="cifar-10-python.tar.gz")
    parser.add_argument("--num-labeled", type=int, default=250, help="multiple of 10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-per-class", type=int, default=500)
    add_output_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = build_cifar10(args.tarball, args.output, num_labeled=args.num_labeled, seed=args.seed,
                         val_per_class=args.val_per_class, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
