#!/usr/bin/env python
"""Regenerate the golden fixtures in tests/golden/ from checkouts of the original code bases.

    STIL_ORIGINAL_SRC=<siyi-wind/STiL> TIP_ORIGINAL_SRC=<siyi-wind/TIP> \\
    USB_ORIGINAL_SRC=<microsoft/Semi-supervised-learning> L2I_ORIGINAL_SRC=<WeiHongLee/Learning-to-impute> \\
        python scripts/golden/generate.py [--only NAME ...]

Each ``gen_<origin>.py`` in this folder defines ``ENV`` (the variable naming its checkout),
``NEEDS`` (the extra packages the original imports) and ``generate() -> list[str]`` (fixture names
written). A generator whose checkout is not named is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="generator names, e.g. gen_stil")
    args = parser.parse_args(argv)
    names = sorted(p.stem for p in HERE.glob("gen_*.py"))
    for name in names:
        if args.only and name not in args.only:
            continue
        module = importlib.import_module(name)
        if not os.environ.get(module.ENV):
            print(f"{name}: skipped, set {module.ENV} to a checkout of the original ({', '.join(module.NEEDS)} needed)")
            continue
        written = module.generate()
        print(f"{name}: wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
