#!/usr/bin/env python
"""Write an embedded synthetic stil dataset (see docs/synthetic.md).

    python scripts/make_synthetic.py --task multimodal --output data/synth_dvm
    python scripts/make_synthetic.py --task image --output data/synth_cifar --num-samples 5000
    python scripts/make_synthetic.py --task landmarks --output data/synth_faces --image-size 60

The folder is written atomically by data_utils.io.save_dataset: DatasetDict (train/validation/
test), stil_dataset.json and, for multimodal, tabular_schema.json. An existing folder is refused
unless --overwrite is given; a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_utils.io import DatasetExistsError, load_dataset  # noqa: E402
from data_utils.splits import SplitError  # noqa: E402
from data_utils.synthetic import (  # noqa: E402
    DEFAULTS, TASKS, SyntheticConfigError, format_budget, make_synthetic_dataset,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--output", required=True, help="dataset folder to create")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="rows over all splits (default: " +
                        ", ".join(f"{t} {d['num_samples']}" for t, d in DEFAULTS.items()) + ")")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes (default: multimodal 20, image 10; not for landmarks)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square image side in pixels (default: multimodal 64, image 32, landmarks 60)")
    parser.add_argument("--seed", type=int, default=2022)
    parser.add_argument("--labeled-fraction", type=float, default=0.01,
                        help="fraction of train rows that keep their label (at least one per class)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--budget", action="store_true",
                        help="also fit quick sklearn models per modality and store/print the information budget")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    started = time.perf_counter()
    try:
        path = make_synthetic_dataset(
            args.task, args.output, num_samples=args.num_samples, num_classes=args.num_classes,
            image_size=args.image_size, seed=args.seed, labeled_fraction=args.labeled_fraction,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, overwrite=args.overwrite,
            measure_budget=args.budget, progress=not args.no_progress,
        )
    except (SyntheticConfigError, DatasetExistsError, SplitError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    dataset_dict, metadata, _ = load_dataset(path)
    sizes = ", ".join(f"{name} {len(split)}" for name, split in dataset_dict.items())
    print(f"wrote {path} ({sizes}; {len(metadata.labeled_indices or [])} labelled) in {seconds:.1f} s")
    if args.task == "multimodal":
        print("noise-free Bayes ceilings:", json.dumps(metadata.source["bayes_ceilings_noise_free"]))
    if "information_budget" in metadata.source:
        print(format_budget(metadata.source["information_budget"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
