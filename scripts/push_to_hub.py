#!/usr/bin/env python
"""Upload an exported run folder (model, processor, model card, run config and info, metrics, plots) to the Hub.

    python scripts/push_to_hub.py --folder runs/default --repo-id user/stil-default [--private]

Only a reviewed allow-list of the files the run wrote is sent (modeling_stil/training/hub.py; printed
before sending), with paths made relative: never checkpoints, TensorBoard event files or files the run
did not write. Offline or unauthorised, it fails with one line and leaves the folder untouched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--commit-message", default="Upload stil model")
    args = parser.parse_args(argv)

    from modeling_stil.training.hub import HubUploadError, push_folder

    try:
        info = push_folder(args.folder, args.repo_id, token=args.token, private=args.private, commit_message=args.commit_message)
    except HubUploadError as error:
        print(f"push_to_hub.py: {error}", file=sys.stderr)
        return 1
    print(getattr(info, "commit_url", info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
