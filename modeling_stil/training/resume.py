"""Resume preflight: before anything is loaded or written, a resume is compared with the run it continues
(settings, method, dataset content), so a refused resume leaves the run folder untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_utils.fingerprint import dataset_content_digest
from data_utils.preparation import dataset_source

from . import checkpointing as ckpt

# Settings a resumed run may change: they are applied from the resume on (with a warning). Every other
# setting shapes the optimisation (optimizer, schedule, data stream, method) and must stay as it was.
APPLIED_ON_RESUME = frozenset({
    "resume_from_checkpoint", "stop_after_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "report_to", "run_name", "disable_tqdm", "plots", "export", "push_to_hub", "hub_model_id", "hub_private",
    "hub_token", "dataloader_num_workers", "per_device_eval_batch_size", "max_eval_samples", "overwrite_output_dir",
    "allow_foreign_files", "output_dir", "dataset", "dataset_cache_dir", "bad_images", "torch_compile",
    "channels_last", "find_unused_parameters", "mixed_precision",
})
SCHEDULE_KEYS = ("max_steps", "num_train_epochs")


def preflight_resume(args) -> dict[str, Any] | None:
    """Check a resume before anything is loaded or written (a refused resume leaves the run untouched).

    Compares this run's settings with the run being resumed (its run_config.yaml): settings in
    `APPLIED_ON_RESUME` may change (returned, and warned about); any other change is refused, since
    the optimizer, the schedule and the data stream are restored from the checkpoint and would
    silently ignore it. Raising max_steps is refused with how to continue (a new run ``--init_from``
    the export): the learning-rate schedule is tied to max_steps and has ended. Also compares the
    method and the dataset's content (not its path) with the checkpoint's fingerprint."""
    import yaml

    targs = args.training
    if not targs.resume_from_checkpoint:
        return None
    path = ckpt.resolve_checkpoint(targs.resume_from_checkpoint, targs.output_dir)
    saved = ckpt.read_checkpoint_state(path)
    fingerprint = saved.get("fingerprint") or {}
    problems = []
    if fingerprint.get("method") not in (None, targs.method):
        problems.append(f"method: checkpoint {fingerprint.get('method')!r}, this run {targs.method!r}")
    run_config = path.parent.parent / "run_config.yaml"
    previous = yaml.safe_load(run_config.read_text()) if run_config.is_file() else None
    current = args.recorded_dict()  # no secret is compared, printed or recorded
    changed: dict[str, tuple[Any, Any]] = {}
    if isinstance(previous, dict):
        if args.model.model is None and previous.get("model"):
            # no --model: the model followed the data when the run started; resume with that one
            args.model.model = previous["model"]
            current["model"] = previous["model"]
        for key, value in current.items():
            if key in previous and previous[key] != value:
                changed[key] = (previous[key], value)
    elif targs.max_steps > 0 and saved.get("max_steps") not in (None, targs.max_steps):
        changed["max_steps"] = (saved.get("max_steps"), targs.max_steps)
    schedule = {k: v for k, v in changed.items() if k in SCHEDULE_KEYS}
    refused = {k: v for k, v in changed.items() if k not in APPLIED_ON_RESUME and k not in SCHEDULE_KEYS and k != "method"}
    applied = {k: v for k, v in changed.items() if k in APPLIED_ON_RESUME and k not in ("resume_from_checkpoint", "overwrite_output_dir")}
    description = fingerprint.get("dataset_description") or {}
    source = dataset_source(args.data)
    if "content" in description and Path(source).exists():
        content = dataset_content_digest(source)
        if content != description["content"]:
            problems.append(f"dataset: {source} has other content than the dataset the checkpoint was trained on "
                            f"(content digest {content} vs {description['content']})")
            problems += changed_vocabularies(source, description)
    if refused:
        problems.append(
            "settings differ from the run being resumed (the checkpoint restores the optimizer, schedule, data "
            "stream and method state, so they would be ignored): "
            + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(refused.items()))
            + "; resume with the original values, or start a new run (another --output_dir, --init_from "
            f"{targs.output_dir} to start from its export)"
        )
    if schedule:
        step = (saved.get("step") if isinstance(saved.get("step"), int) else "?")
        problems.append(
            "the schedule length changed (" + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(schedule.items()))
            + f"): the learning-rate schedule is tied to it (the checkpoint is at step {step}; a finished cosine "
            "schedule would go on at learning rate 0). To train longer, start a new run from this one's export: "
            f"--init_from {targs.output_dir} --max_steps N --output_dir NEW_DIR"
        )
    if problems:
        raise ckpt.IncompatibleCheckpointError(
            f"cannot resume from {path}:\n  " + "\n  ".join(problems)
        )
    if applied:
        print("resume: applying changed settings from here on: "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(applied.items())))
    return {"checkpoint": str(path), "changed_settings": {k: list(v) for k, v in applied.items()}}



def changed_vocabularies(source: str, description: dict[str, Any]) -> list[str]:
    """The categorical columns of ``source`` whose vocabularies differ by value from the checkpoint's data."""
    from data_utils.schema import SCHEMA_FILENAME, TabularSchema
    from modeling_stil.configuration_common import vocabulary_differences

    saved = description.get("vocabularies")
    if not saved or not (Path(source) / SCHEMA_FILENAME).is_file():
        return []
    try:
        current = TabularSchema.load(source)
    except (OSError, ValueError, KeyError, TypeError):
        return []  # an unreadable schema is reported when the dataset is loaded
    checkpoint = {"fields": [{"name": n, "kind": "categorical", "categories": c} for n, c in saved.items()]}
    return vocabulary_differences(checkpoint, current, model="the checkpoint's data", data="this dataset")
