#!/usr/bin/env python
"""Train, select, test and export a stil model.

    accelerate launch [--config_file accelerate_configs/X.yaml] train.py [RECIPE.yaml] [--key value ...]

With no arguments: the default job (recipes/default.yaml's values are the argument defaults):
the supervised multimodal baseline on the embedded synthetic image+tabular dataset, evaluated on
validation, best model tested, exported to runs/default and reloaded with AutoModel.from_pretrained.
`python train.py --help` lists every key. Exit status: 0 done, 1 run failed, 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from modeling_stil.training.arguments import ArgumentError, parse_run_arguments
    from modeling_stil.training.checkpointing import IncompatibleCheckpointError
    from modeling_stil.training.hub import HubUploadError
    from modeling_stil.training.logging import TrackerUnavailableError
    from modeling_stil.training.trainer import NonFiniteLossError, build_and_train

    try:
        args = parse_run_arguments(argv)
    except ArgumentError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    try:
        results = build_and_train(args)
    except (NonFiniteLossError, IncompatibleCheckpointError, TrackerUnavailableError, HubUploadError, FileExistsError, FileNotFoundError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1
    summary = {k: results.get(k) for k in ("stopped_at_step", "best_step", "metric_for_best_model", "validation", "test", "train_seconds") if k in results}
    if results.get("reload_check"):
        summary["reload_check"] = results["reload_check"]
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
