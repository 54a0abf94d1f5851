"""The run folder (``output_dir``): what a run writes there and the checks before it writes anything.

A folder is never entered by mistake: a previous run is removed only when asked (``--overwrite_output_dir``)
and only the paths its manifest lists (manifest.py); no file stil did not write stands where this run will
write; a run folder written before manifests existed is adopted on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import checkpointing, manifest
from .tracking import JSONL_LOG
from .plots import PLOT_FILES
from .provenance import stil_module_files

# Names a run writes at the top of its output_dir (besides checkpoints/, logs/, plots/). Which files are
# the run's is decided by its manifest (manifest.py), never by these names: they serve the check before
# a run starts (`planned_outputs`), the adoption of a run folder written before manifests existed, and
# push_to_hub's allow-list (hub.py).
RUN_FILES = ("run_config.yaml", "run_info.json")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "processor_config.json", "README.md", "eval_results.json")


def write_run_files(args, output_dir: Path, info: dict[str, Any]) -> None:
    """run_config.yaml (the settings, secrets left out) and run_info.json (data, split, versions, fingerprint)."""
    manifest.claim_all(output_dir, [*RUN_FILES, ".run_info.json.tmp"])
    args.save_yaml(output_dir / "run_config.yaml")
    tmp = output_dir / ".run_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, output_dir / "run_info.json")


def tracker_run_name(targs) -> str:
    """The folder under logs/ where Accelerate's trackers (TensorBoard) write: the run name."""
    return targs.run_name or Path(targs.output_dir).name


def planned_outputs(targs) -> list[str]:
    """Paths this run will write whose names are known before it starts (relative to output_dir)."""
    out = Path(targs.output_dir)
    names = [*RUN_FILES, JSONL_LOG]
    report_to = [targs.report_to] if isinstance(targs.report_to, str) else list(targs.report_to or [])
    if [name for name in report_to if str(name).strip().lower() not in ("", "none", "jsonl")]:
        names.append(f"logs/{tracker_run_name(targs)}")
    if targs.plots:
        names += [f"plots/{name}" for name in PLOT_FILES]
    if targs.export:
        names += [*EXPORT_FILES, *stil_module_files(), *(p.name for p in out.glob("model-*.safetensors"))]
    return names


def holds_unlisted_run(out: Path) -> bool:
    """A run folder written before run manifests existed: its run files or a complete checkpoint (a
    ``config.json`` alone is not a run: it may be anyone's)."""
    return bool(checkpointing.list_checkpoints(checkpointing.checkpoints_root(out))) or all((out / n).is_file() for n in RUN_FILES)


def adopt_unlisted_run(targs) -> list[str]:
    """Resuming a run folder written before manifests: list the files that run wrote, recognised by the
    names it used (the only rule those versions had), so the resumed run may replace them. Only on a
    resume: the user named the folder as a stil run."""
    out = Path(targs.output_dir)
    trees = [f"{checkpointing.CHECKPOINTS_DIRNAME}/{p.name}" for p in checkpointing.list_checkpoints(checkpointing.checkpoints_root(out))]
    if (out / "logs" / tracker_run_name(targs)).is_dir():
        trees.append(f"logs/{tracker_run_name(targs)}")
    candidates = [*RUN_FILES, JSONL_LOG, *(f"plots/{n}" for n in PLOT_FILES), *EXPORT_FILES, *stil_module_files(),
                  *(p.name for p in out.glob("model-*.safetensors"))]
    files = [rel for rel in candidates if (out / rel).is_file()]
    if "README.md" in files:  # the model card, not a user's README
        head = (out / "README.md").read_text(errors="replace")[:2000]
        if not (head.startswith("---") and "stil" in head):
            files.remove("README.md")
    manifest.claim_all(out, trees, kind="tree", adopt=True)
    manifest.claim_all(out, files, adopt=True)
    print(f"resume: {out} was written without a run manifest; listed {len(trees) + len(files)} of its paths as this "
          f"run's in {manifest.MANIFEST_FILENAME} (checkpoints, run files, logs, plots, export)")
    return trees + files


def clean_output_dir(out: Path) -> list[str]:
    """--overwrite_output_dir: remove what the previous run wrote (its manifest's paths), and only that."""
    kept = len(manifest.unlisted_files(out))
    removed = manifest.remove_listed(out)
    print(f"--overwrite_output_dir: removed the previous run's {len(removed)} listed paths from {out}"
          + (f"; kept {kept} files stil did not write" if kept else ""))
    return removed


def check_output_dir(targs) -> None:
    """Before anything is built or written: a run folder is never entered by mistake, a previous run is
    removed only when asked (and only its listed files), and no file stil did not write stands where
    this run will write."""
    out = Path(targs.output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a folder; choose another --output_dir")
    listed = manifest.read(out)
    unlisted_run = listed is None and holds_unlisted_run(out)
    if targs.resume_from_checkpoint and unlisted_run:
        return  # its files are adopted before the resumed run writes (adopt_unlisted_run)
    if not targs.resume_from_checkpoint and (listed or unlisted_run):
        if not targs.overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
                "--overwrite_output_dir to start again there, or choose another --output_dir"
            )
        if unlisted_run:
            raise FileExistsError(
                f"output_dir {out} holds a run written without a manifest ({manifest.MANIFEST_FILENAME}, by an older stil), "
                "so stil cannot tell its files from yours and removes none: delete that run's files yourself or choose "
                "another --output_dir"
            )
        foreign = manifest.unlisted_files(out)
        if foreign and not targs.allow_foreign_files:
            raise FileExistsError(
                f"--overwrite_output_dir would remove the previous run in {out}, which also holds files stil did not "
                f"write: {', '.join(foreign[:10])}{' ...' if len(foreign) > 10 else ''}; move them, choose another "
                "--output_dir, or pass --allow_foreign_files true (they are kept: only the paths listed in "
                f"{manifest.MANIFEST_FILENAME} are removed)"
            )
    collisions = [rel for rel in planned_outputs(targs) if not manifest.owns(listed, rel) and (out / rel).exists()]
    if collisions:
        export_only = all(rel in EXPORT_FILES or rel.endswith((".py", ".safetensors")) for rel in collisions)
        raise manifest.ForeignFileError(out, collisions, "this run writes files of those names"
                                        + (" (its export; --export false writes none)" if export_only else ""))

