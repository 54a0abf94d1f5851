"""Job assembly: from parsed run arguments to a trained, selected, tested and exported model.

``build_and_train(args)`` is what ``train.py`` runs; ``fit(recipe_or_dict, **overrides)`` is the same
path for notebooks. Pieces: the dataset (or the embedded synthetic one), the labelled split, the model
(preset that fits the data, ``--init_from`` encoders), the method (``setup`` with the data sizes), the
loaders, then `Trainer` (trainer.py) and `export_run` (export.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpointing as ckpt
from . import manifest
from .logging import JSONL_LOG, resolve_trackers, tracker_config
from .trainer import JobError, Trainer, _move, make_accelerator, schedule_lengths

def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("stil", "torch", "accelerate", "transformers", "huggingface_hub", "datasets", "timm", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    import platform

    versions["python"] = platform.python_version()
    return versions


def git_commit(path: str | os.PathLike = ".") -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


# ----------------------------------------------------------------------------------------- trainer
def stil_cache_dir() -> Path:
    return Path(os.environ.get("STIL_CACHE", Path.home() / ".cache" / "stil"))


def synthetic_dataset_path(data_args) -> Path:
    root = Path(data_args.dataset_cache_dir) if data_args.dataset_cache_dir else stil_cache_dir() / "datasets"
    fraction = data_args.labeled_fraction if data_args.labeled_fraction is not None else 0.1
    name = f"synthetic-{data_args.synthetic_task}-n{data_args.synthetic_num_samples}-s{data_args.synthetic_image_size}-l{fraction:g}"
    return root / name


def prepare_dataset(args, accelerator) -> tuple[str, Any, Any, Any]:
    """Resolve the dataset argument: build the embedded synthetic dataset when none is given.

    Returns ``(source, DatasetDict, DatasetMetadata, TabularSchema | None)``."""
    data = args.data
    source = data.dataset
    if source is None:
        from data_utils.synthetic import make_synthetic_dataset

        path = synthetic_dataset_path(data)

        def build_if_missing(builder: bool) -> None:
            if builder and not path.exists():
                print(f"building the synthetic {data.synthetic_task} dataset into {path}", flush=True)
                make_synthetic_dataset(
                    data.synthetic_task, path, num_samples=data.synthetic_num_samples,
                    image_size=data.synthetic_image_size,
                    labeled_fraction=data.labeled_fraction if data.labeled_fraction is not None else 0.1,
                )

        # the main process builds it; then the first process of each other machine, if that machine does
        # not see it (a disk of its own; on a shared filesystem it is already there, so nobody races)
        with accelerator.main_process_first():
            build_if_missing(accelerator.is_main_process)
        with accelerator.local_main_process_first():
            build_if_missing(accelerator.is_local_main_process)
        source = str(path)
    dataset_dict, metadata, schema = load_dataset_or_explain(source, synthetic=data.dataset is None)
    dataset_dict = check_images(dataset_dict, metadata, data.bad_images, accelerator)
    return source, dataset_dict, metadata, schema


def load_dataset_or_explain(source: str, synthetic: bool = False):
    """``data_utils.io.load_dataset`` with a one-line error naming the unreadable split/file and how
    to rebuild it, instead of a pyarrow traceback."""
    from data_utils.io import load_dataset

    try:
        return load_dataset(source)
    except FileNotFoundError as error:  # data_utils.io.DatasetError: missing path, not a dataset, unreadable
        bad = unreadable_dataset_files(source) if Path(source).is_dir() else []
        if not bad:
            raise
        reason = str(error).strip().splitlines()[0]
        fix = (f"delete {source} and run again: the synthetic dataset is rebuilt" if synthetic else
               "rebuild it with the script that made it (scripts/prepare_dataset.py, scripts/build_*.py, "
               "scripts/make_synthetic.py) or copy it again from its origin")
        raise JobError(f"dataset {source} is damaged: cannot read {', '.join(bad[:5])} ({reason[:200]}); {fix}") from None
    except Exception as error:  # pyarrow.lib.ArrowInvalid / ArrowIOError, OSError, a damaged JSON file
        import pyarrow as pa

        if not isinstance(error, (pa.ArrowException, OSError, ValueError)):
            raise
        bad = unreadable_dataset_files(source)
        where = ", ".join(bad[:5]) if bad else "one of its files"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fix = (f"delete {source} and run again: the synthetic dataset is rebuilt" if synthetic else
               "rebuild it with the script that made it (scripts/prepare_dataset.py, scripts/build_*.py, "
               "scripts/make_synthetic.py) or copy it again from its origin")
        raise JobError(f"dataset {source} is damaged: cannot read {where} ({type(error).__name__}: {reason}); {fix}") from None


def unreadable_dataset_files(source: str) -> list[str]:
    """Files of a ``save_to_disk`` folder that do not parse (arrow streams, JSON), as 'split/file' paths."""
    import pyarrow as pa

    root = Path(source)
    if not root.is_dir():
        return []
    bad = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".arrow":
                with pa.memory_map(str(path)) as handle:
                    pa.ipc.open_stream(handle).read_all()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:  # noqa: BLE001 -- any failure means this file is the damaged one
            bad.append(str(path.relative_to(root)))
    return bad


def check_images(dataset_dict, metadata, mode: str, accelerator=None):
    """Decode every stored image once before training (``--bad_images``): 'error' refuses the run
    listing the unreadable rows (split, row, reason); 'skip' drops them with a warning.

    Returns the dataset dict (without the bad rows in 'skip' mode)."""
    import numpy as np

    from data_utils.loaders import open_stored_image

    column = getattr(metadata, "image_column", None)
    if column is None:
        return dataset_dict
    problems: dict[str, list[tuple[int, str]]] = {}
    for split, ds in dataset_dict.items():
        if column not in ds.column_names:
            continue
        raw = ds.select_columns([column])
        feature = raw.features[column]
        if hasattr(feature, "decode"):
            import datasets

            raw = raw.cast_column(column, datasets.Image(decode=False))
        for row, value in enumerate(raw[column]):
            try:
                with open_stored_image(value) as handle:
                    handle.load()
            except Exception as error:  # noqa: BLE001 -- PIL raises many types for a damaged image
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                problems.setdefault(split, []).append((row, f"{type(error).__name__}: {reason}"))
    if not problems:
        return dataset_dict
    total = sum(len(v) for v in problems.values())
    listing = "; ".join(f"{split} row {row}: {reason}" for split, rows in problems.items() for row, reason in rows[:5])
    if mode != "skip":
        raise JobError(
            f"{total} stored image(s) cannot be decoded ({listing}{' ...' if total > 5 else ''}); repair or rebuild the "
            "dataset, or pass --bad_images skip to drop those rows"
        )
    dataset_dict = dataset_dict.copy() if hasattr(dataset_dict, "copy") else dict(dataset_dict)
    for split, rows in problems.items():
        ds = dataset_dict[split]
        if split == "train" and metadata.labeled_column not in ds.column_names and metadata.labeled_indices is not None:
            mask = np.zeros(len(ds), dtype=bool)
            mask[np.asarray(metadata.labeled_indices, dtype=np.int64)] = True
            ds = ds.add_column(metadata.labeled_column, mask.tolist())  # positions change below
        bad = {row for row, _ in rows}
        dataset_dict[split] = ds.select([i for i in range(len(ds)) if i not in bad])
    message = f"warning: --bad_images skip: dropped {total} row(s) whose image cannot be decoded ({listing})"
    (accelerator.print if accelerator is not None else print)(message)
    return dataset_dict


def labeled_indices_for(args, dataset_dict, metadata) -> list[int]:
    """Training rows that keep their label: re-drawn when asked, else the dataset's own split."""
    return labeled_split(args, dataset_dict, metadata)[0]


def labeled_split(args, dataset_dict, metadata) -> tuple[list[int], str]:
    """(training rows that keep their label, how they were chosen, for the run's "labelled rows" line).

    With a dataset, ``labeled_fraction`` / ``labeled_per_class`` redraw its labels; a recipe's value that
    meets a ``--dataset`` from the command line has been cleared by the argument parser
    (`arguments.keep_own_labels`), so the dataset keeps its own split. Without a dataset the fraction is a
    parameter of the synthetic dataset's build."""
    import numpy as np
    from data_utils.splits import check_labeled_split, select_labeled

    train = dataset_dict["train"]
    data = args.data
    asked = {k: getattr(data, k) for k in ("labeled_fraction", "labeled_per_class") if getattr(data, k) is not None}
    redraw = data.dataset is not None and bool(asked)
    labels = np.asarray(train[metadata.label_column]) if metadata.task == "classification" else None
    if data.dataset is None:
        fraction = data.labeled_fraction if data.labeled_fraction is not None else 0.1
        how = f"the synthetic dataset's split, built with labeled_fraction {fraction:g}"
    elif redraw:
        how = "re-drawn: " + ", ".join(f"{k} {v:g}" for k, v in asked.items()) + f", seed {args.training.seed}"
    else:
        how = "dataset's own split"
        for key, value in (getattr(args, "unapplied", None) or {}).items():
            how += (f"; the recipe's {key} {value:g} is not applied to a --dataset: pass --{key} {value:g} on the "
                    "command line to re-draw the labels")
    if redraw:
        if metadata.task != "classification":
            n = len(train)
            if data.labeled_per_class is not None:
                raise ValueError("labeled_per_class needs a classification dataset; use labeled_fraction")
            rng = np.random.default_rng(args.training.seed)
            indices = np.sort(rng.choice(n, size=max(1, int(round(data.labeled_fraction * n))), replace=False))
        else:
            indices = select_labeled(labels, fraction=data.labeled_fraction, per_class=data.labeled_per_class, seed=args.training.seed)
    elif metadata.labeled_column in train.column_names:
        indices = np.flatnonzero(np.asarray(train[metadata.labeled_column], dtype=bool))
    elif metadata.labeled_indices is not None:
        indices = np.asarray(metadata.labeled_indices)
    else:
        indices = np.arange(len(train))  # fully labelled dataset
    if labels is not None:
        mask = np.zeros(len(train), dtype=bool)
        mask[indices] = True
        check_labeled_split(labels, mask, num_classes=metadata.num_labels)
    return [int(i) for i in indices], how


def dataset_content_digest(source: str) -> str:
    """A digest of a dataset folder's content, not its path: a moved or copied dataset has the same one.

    Each data/metadata file contributes its path inside the folder, its size and a hash of its first
    and last MiB (cheap on large datasets; a rebuilt or edited dataset differs). A Hub id is its own name."""
    import hashlib

    root = Path(source)
    if not root.is_dir():
        return str(source)
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        name = path.name
        if not path.is_file() or name.startswith((".", "cache-")) or path.suffix not in (".arrow", ".json", ".parquet"):
            continue
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            h.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                h.update(handle.read(1 << 20))
    return h.hexdigest()[:16]


def dataset_fingerprint(source: str, dataset_dict, metadata, schema, labeled: list[int]) -> dict[str, Any]:
    return {
        "content": dataset_content_digest(source),
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "labeled": ckpt.digest(labeled),
        "num_labeled": len(labeled),
        "schema": ckpt.digest(schema.to_dict()) if schema is not None else None,
    }


def apply_labeled_split(dataset_dict, metadata, labeled: list[int]):
    """Write the chosen labelled rows into the train split's labeled column (what the loaders read)."""
    import numpy as np

    train = dataset_dict["train"]
    mask = np.zeros(len(train), dtype=bool)
    mask[np.asarray(labeled, dtype=np.int64)] = True
    column = metadata.labeled_column
    if column in train.column_names:
        if np.array_equal(np.asarray(train[column], dtype=bool), mask):
            return dataset_dict
        train = train.remove_columns(column)
    dataset_dict = dataset_dict.copy() if hasattr(dataset_dict, "copy") else dict(dataset_dict)
    dataset_dict["train"] = train.add_column(column, mask.tolist())
    return dataset_dict


def stream_options(args, method) -> dict[str, Any]:
    """The method's stream defaults, overridden by the recipe's data arguments where set."""
    options = dict(type(method).stream_defaults)
    data = args.data
    for key, value in (
        ("unlabeled_includes_labeled", data.unlabeled_includes_labeled),
        ("corruption_pool", data.corruption_pool),
        ("augmentation_rate", data.augmentation_rate),
        ("epoch", data.epoch_definition),
    ):
        if value is not None:
            options[key] = value
    return options


def build_loaders(args, method, model_config, dataset_dict, metadata, schema, accelerator):
    """Training stream (labelled + unlabelled (+ meta), exact resume) and eval loaders (data_utils.loaders)."""
    from dataclasses import replace

    from data_utils.loaders import build_eval_loader, build_train_loaders, resolve_num_workers
    from data_utils.views import ViewConfig, preset_for_task

    options = stream_options(args, method)
    preset = preset_for_task(args.data.view_preset, metadata.task)  # landmarks: weak = translate, for every method
    view_config = ViewConfig.from_model_config(model_config, preset=preset, seed=args.training.seed,
                                               hflip=args.data.hflip)
    if options["augmentation_rate"] is not None:
        view_config = replace(view_config, augmentation_rate=float(options["augmentation_rate"]))
    data = args.data
    # the processes sharing this machine's cores (LOCAL_WORLD_SIZE: set by torchrun and train.py's CPU launcher)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)
    num_workers = resolve_num_workers(data.dataloader_num_workers, local_processes, accelerator.device.type)
    train_stream = build_train_loaders(
        dataset_dict, metadata, schema,
        labeled_views=dict(method.labeled_views) if method.labeled_views is not None else None,
        unlabeled_views=dict(method.unlabeled_views) if method.unlabeled_views is not None else None,
        meta_views=dict(method.meta_views) if method.meta_views is not None else None,
        label_free=method.label_free,
        view_config=view_config,
        batch_size=args.training.per_device_train_batch_size,
        mu=data.mu,
        seed=args.training.seed,
        num_workers=num_workers,
        pin_memory=accelerator.device.type == "cuda",
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        unlabeled_includes_labeled=bool(options["unlabeled_includes_labeled"]),
        corruption_pool=options["corruption_pool"],
        epoch=options["epoch"],
    )
    eval_loaders = {}
    for split in ("validation", "test"):
        if split not in dataset_dict:
            continue
        if data.max_eval_samples is not None and len(dataset_dict[split]) > data.max_eval_samples:
            dataset_dict = dataset_dict.copy()
            dataset_dict[split] = dataset_dict[split].select(range(data.max_eval_samples))
        eval_loaders[split] = build_eval_loader(
            dataset_dict, metadata, schema, split, args.training.per_device_eval_batch_size, view_config,
            views=dict(method.eval_views), num_workers=num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
    if "validation" not in eval_loaders:
        raise ValueError("the dataset has no validation split: best-model selection needs one")
    return train_stream, eval_loaders


def data_info(args, train_stream, dataset_dict, metadata, accelerator, target_stats):
    """What the method learns in ``setup`` (sizes before prepare)."""
    from ..methods.base import DataInfo

    targs = args.training
    gas = targs.gradient_accumulation_steps
    steps_per_epoch, max_steps = schedule_lengths(targs, train_stream.steps_per_epoch)
    mean, std = (None, None) if target_stats is None else (target_stats[0].tolist(), target_stats[1].tolist())
    return DataInfo(
        num_labeled=train_stream.num_labeled,
        num_unlabeled=train_stream.num_unlabeled,
        num_train=len(dataset_dict["train"]),
        split_sizes={k: len(v) for k, v in dataset_dict.items()},
        labeled_batch_size=train_stream.labeled_batch_size if train_stream.labeled_sampler is not None else 0,
        unlabeled_batch_size=train_stream.unlabeled_batch_size if train_stream.unlabeled_sampler is not None else 0,
        meta_batch_size=train_stream.meta_batch_size,
        num_processes=accelerator.num_processes,
        gradient_accumulation_steps=gas,
        mixed_precision=str(accelerator.mixed_precision),
        task=metadata.task,
        num_labels=metadata.num_labels,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        unlabeled_includes_labeled=bool(len(train_stream.unlabeled_rows) == len(dataset_dict["train"])),
        target_mean=mean,
        target_std=std,
    )


def labeled_target_stats(dataset_dict, metadata, labeled: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target mean and unbiased std over the labelled train rows (the AFLW protocol)."""
    import numpy as np

    values = np.asarray(dataset_dict["train"].select(labeled)[metadata.label_column], dtype=np.float64)
    values = values.reshape(len(labeled), -1)
    if len(labeled) < 2:
        raise JobError("standardize_targets needs at least 2 labelled rows")
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def build_model(args, schema, metadata, method_cls=None, say=print):
    """The model: ``--model`` (a preset, folder or Hub id), checked against the data and the method,
    then ``--init_from`` encoders (a report of loaded / skipped tensors is printed and returned)."""
    from modeling_stil.presets import create_model

    from modeling_stil.configuration_common import DataCompatibilityError

    overrides = dict(args.model.model_overrides or {})
    named = args.model.model is not None
    name = choose_model(args, schema, metadata, method_cls)
    try:
        model = create_model(name, schema=schema, metadata=metadata, **overrides)
    except DataCompatibilityError:
        raise
    except (ValueError, KeyError, TypeError) as error:  # unknown preset, bad override: one line, no traceback
        text = error.args[0] if error.args else str(error)
        raise JobError(f"--model {name}: {text}") from None
    model = model.float()
    check = getattr(model, "check_data_compatibility", None)
    if check is not None:
        check(schema, metadata)
    check_data_modalities(model, name, schema, metadata)
    if method_cls is not None:
        check_modalities(model, method_cls, name)
        check_image_only(model, method_cls, name, named)
        check_prediction_head(model, method_cls, name)
    ignored = ignored_columns_note(model, name, named, method_cls, schema)
    if ignored:
        say(ignored)
    return model


def choose_model(args, schema, metadata, method_cls=None) -> str:
    """``--model``, checked against the data; without it, the method's preferred preset when it fits
    the data, else a preset that fits the data and the method's modalities (modeling_stil.presets)."""
    from modeling_stil.presets import check_preset_fits, default_preset_for, preset_misfit

    required = tuple(method_cls.required_modalities) if method_cls is not None else ()
    name = args.model.model
    try:
        if name is None:
            preferred = getattr(method_cls, "preferred_model", None)
            if preferred and not preset_misfit(preferred, schema, metadata, required):
                name = preferred
            else:
                name = default_preset_for(schema, metadata, required_modalities=required)
            args.model.model = name  # recorded in run_config.yaml as what was really used
        else:
            check_preset_fits(name, schema, metadata, required_modalities=required)
    except ValueError as error:
        method = f"method {method_cls.name!r}: " if method_cls is not None else ""
        raise JobError(f"{method}{error}") from None
    return name


def check_data_modalities(model, model_name: str, schema, metadata) -> None:
    """The model's inputs must exist in the data, also when the data states no schema at all
    (image-only data has none: a tabular model would otherwise fail inside its encoder at step 0)."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    has = set()
    if getattr(metadata, "image_column", "image") is not None:
        has.add("image")
    if schema is not None:
        has.add("tabular")
    missing = sorted(reads - has)
    if missing and reads:
        kind = "+".join(sorted(has)) or "no"
        suggestion = {"image": "an image model (e.g. --model image-tiny)", "tabular": "a tabular model (e.g. --model tabular-tiny)",
                      "image+tabular": "an image+tabular model (e.g. --model multimodal-concat-tiny)"}.get(kind, "a matching model")
        raise JobError(
            f"--model {model_name} reads {'+'.join(sorted(reads))} inputs but the dataset has {kind}-only data "
            f"(no {' and no '.join(missing)} input); choose {suggestion} or an image+tabular dataset"
        )


def check_prediction_head(model, method_cls, model_name: str) -> None:
    """A method that trains on labels needs a model with a prediction head (``logits``); pretraining
    networks (TipModel: ``_needs_labels = False``) have none."""
    if method_cls.label_free or getattr(model, "_needs_labels", True):
        return
    raise JobError(
        f"--model {model_name} is a pretraining network without a prediction head (its outputs have no logits), "
        f"but method {method_cls.name!r} trains on labels; choose a classifier (e.g. --model multimodal-tip-tiny or "
        f"stil-tiny), or pretrain with a label-free method and start a classifier from it with --init_from"
    )


def _multimodal_variant(method_cls) -> str | None:
    from ..methods.base import METHODS

    name = f"multimodal_{method_cls.name}" if method_cls is not None else None
    return name if name in METHODS else None


def check_image_only(model, method_cls, model_name: str, named: bool) -> None:
    """An image-only method (SimMatch, CoMatch) refuses a model that reads the table, in one line with the fix."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    if not getattr(method_cls, "image_only", False) or "tabular" not in reads:
        return
    variant = _multimodal_variant(method_cls)
    raise JobError(
        f"method {method_cls.name!r} trains on the images alone but --model {model_name} reads image+tabular input"
        + (f"; use --method {variant} with this model" if variant else "")
        + (" or an image model (drop --model: an image model is chosen and the table is ignored)" if named
           else " or an image model (--model image-tiny)")
    )


def ignored_columns_note(model, model_name: str, named: bool, method_cls, schema) -> str | None:
    """One line when the model reads only the images of image+tabular data: which model, and which columns
    it ignores (an image-only method's model leaves the table out; the user should know)."""
    reads = set(getattr(model, "input_modalities", ()) or ())
    if schema is None or not schema.names or not reads or "tabular" in reads:
        return None
    why = "named by --model" if named else (f"chosen for method {method_cls.name!r}" if method_cls is not None else "chosen")
    variant = _multimodal_variant(method_cls)
    columns = schema.names
    shown = ", ".join(columns[:12]) + (f" and {len(columns) - 12} more" if len(columns) > 12 else "")
    return (f"model {model_name} ({why}) reads only the images: it ignores the tabular columns {shown}"
            + (f"; --method {variant} uses them" if variant else "; an image+tabular model uses them"))


def check_modalities(model, method_cls, model_name: str) -> None:
    """A method that needs both modalities refuses a unimodal model with a one-line fix."""
    needed = set(method_cls.required_modalities)
    if not needed:
        return
    has = set(getattr(model, "input_modalities", ()) or ())
    missing = sorted(needed - has)
    if missing:
        raise JobError(
            f"method {method_cls.name!r} needs a model reading {sorted(needed)}, but --model {model_name} reads "
            f"{sorted(has) or 'nothing'}; choose an image+tabular model (e.g. --model stil-tiny) and an image+tabular dataset"
        )


def write_run_files(args, output_dir: Path, info: dict[str, Any]) -> None:
    manifest.claim_all(output_dir, [*RUN_FILES, ".run_info.json.tmp"])
    args.save_yaml(output_dir / "run_config.yaml")
    tmp = output_dir / ".run_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, output_dir / "run_info.json")


# Names a run writes at the top of its output_dir (besides checkpoints/, logs/, plots/). Which files are
# the run's is decided by its manifest (manifest.py), never by these names: they serve the check before
# a run starts (`planned_outputs`), the adoption of a run folder written before manifests existed, and
# push_to_hub's allow-list (hub.py).
RUN_FILES = ("run_config.yaml", "run_info.json")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "processor_config.json", "README.md", "eval_results.json")


def stil_module_files() -> list[str]:
    """The files an export may copy next to its weights (custom code for ``auto_map``): modeling_stil's modules."""
    return sorted(p.name for p in Path(__file__).resolve().parents[1].glob("*.py") if p.name != "__init__.py")


def tracker_run_name(targs) -> str:
    """The folder under logs/ where Accelerate's trackers (TensorBoard) write: the run name."""
    return targs.run_name or Path(targs.output_dir).name


def planned_outputs(targs) -> list[str]:
    """Paths this run will write whose names are known before it starts (relative to output_dir)."""
    from .plots import PLOT_FILES

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
    from . import checkpointing

    return bool(checkpointing.list_checkpoints(checkpointing.checkpoints_root(out))) or all((out / n).is_file() for n in RUN_FILES)


def adopt_unlisted_run(targs) -> list[str]:
    """Resuming a run folder written before manifests: list the files that run wrote, recognised by the
    names it used (the only rule those versions had), so the resumed run may replace them. Only on a
    resume: the user named the folder as a stil run."""
    from . import checkpointing
    from .plots import PLOT_FILES

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
    source = args.data.dataset or str(synthetic_dataset_path(args.data))
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


def assemble(args, accelerator):
    """Dataset, labelled split, model (+ ``--init_from``), method (+ ``setup``) and loaders.

    Returns a dict with every piece the loop and the export need."""
    from accelerate.utils import set_seed

    from ..methods.base import get_method_class

    targs = args.training
    source, dataset_dict, metadata, schema = prepare_dataset(args, accelerator)
    method_cls = get_method_class(targs.method)
    method_cls.check_task(metadata.task)
    labeled = []
    if not method_cls.label_free:
        labeled, how = labeled_split(args, dataset_dict, metadata)
        accelerator.print(f"labelled rows: {len(labeled)} of {len(dataset_dict['train'])} ({how})")
    set_seed(targs.seed)
    model = build_model(args, schema, metadata, method_cls, say=accelerator.print)
    init_report = None
    if args.model.init_from:
        from ..pretrained_init import init_from_pretrained

        init_report = init_from_pretrained(model, args.model.init_from)
        accelerator.print(
            f"--init_from {args.model.init_from}: loaded {len(init_report['loaded'])} tensors, skipped "
            f"{len(init_report['skipped'])}, {len(init_report['not_initialised'])} of this model's tensors keep their initialisation"
        )
    target_stats = None
    if args.data.standardize_targets:
        if metadata.task == "classification":
            raise JobError("standardize_targets is for regression and landmark data; drop it for classification")
        target_stats = labeled_target_stats(dataset_dict, metadata, labeled)
        model.config.target_mean = target_stats[0].tolist()  # travels with the export (original units)
        model.config.target_std = target_stats[1].tolist()
    try:
        method = method_cls(model, args.method)  # copies teachers from the initialised model
    except ValueError as error:  # the method refuses this model (heads, modalities): a one-line error
        raise JobError(str(error)) from None
    if not method_cls.label_free:
        dataset_dict = apply_labeled_split(dataset_dict, metadata, labeled)
    train_stream, eval_loaders = build_loaders(args, method, model.config, dataset_dict, metadata, schema, accelerator)
    method.setup(data_info(args, train_stream, dataset_dict, metadata, accelerator, target_stats))
    if args.model.init_from:
        method_report = method.init_from_pretrained(args.model.init_from)
        init_report["method_state"] = method_report
        if method_report.get("loaded"):
            accelerator.print(f"--init_from: restored {len(method_report['loaded'])} tensors of {targs.method}'s own state")
    return {
        "source": source, "dataset_dict": dataset_dict, "metadata": metadata, "schema": schema, "labeled": labeled,
        "model": model, "method": method, "train_stream": train_stream, "eval_loaders": eval_loaders,
        "target_stats": target_stats, "init_report": init_report,
    }


def build_and_train(args) -> dict[str, Any]:
    """The whole job: data, model, method, loop, selection, test, export (+ reload check, upload)."""
    from accelerate.utils import set_seed

    from .export import export_run
    from .metrics import compute_metrics

    targs = args.training
    check_output_dir(targs)
    resume = preflight_resume(args)  # settings, method, dataset content: before anything is built or written
    accelerator = make_accelerator(args)
    output_dir = Path(targs.output_dir)
    set_seed(targs.seed)

    job = assemble(args, accelerator)
    source, dataset_dict, metadata, schema = job["source"], job["dataset_dict"], job["metadata"], job["schema"]
    model, method, labeled = job["model"], job["method"], job["labeled"]
    fingerprint = ckpt.make_fingerprint(targs.method, model.config.to_dict(), dataset_fingerprint(source, dataset_dict, metadata, schema, labeled))
    # recorded by value (outside the digest, so older checkpoints still resume): a refused resume names the column
    fingerprint["dataset_description"]["vocabularies"] = (
        {f.name: list(f.categories) for f in schema.categorical_fields} if schema is not None else {})
    if resume is not None:  # the whole fingerprint (architecture, labelled split) before run files are rewritten
        ckpt.check_compatible(resume["checkpoint"], fingerprint)
        if accelerator.is_main_process and manifest.read(output_dir) is None:
            adopt_unlisted_run(targs)
    elif targs.overwrite_output_dir and accelerator.is_main_process and output_dir.exists():
        clean_output_dir(output_dir)  # only the paths its manifest lists; validated by check_output_dir
    accelerator.wait_for_everyone()
    info = {
        "seed": targs.seed,
        "dataset": source,
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "labeled_indices": labeled,
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "num_processes": accelerator.num_processes,
        "dataloader_num_workers": job["train_stream"].num_workers,  # what "auto" resolved to
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": library_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),
        "fingerprint": fingerprint,
        "init_from": args.model.init_from,
        "init_report": job["init_report"],
    }
    if resume is not None:
        info["resumed_from"] = resume["checkpoint"]
        info["changed_on_resume"] = resume["changed_settings"]
    if accelerator.is_main_process:
        write_run_files(args, output_dir, info)
    if accelerator.trackers or resolve_trackers(targs.report_to):
        if accelerator.is_main_process:  # TensorBoard writes its event files and hparams.yml in logs/<run name>/
            manifest.claim(output_dir, f"logs/{tracker_run_name(targs)}", kind="tree")
        accelerator.init_trackers(tracker_run_name(targs), config=tracker_config(args.recorded_dict()))

    trainer = Trainer(
        args, method, job["train_stream"], job["eval_loaders"], task=metadata.task, num_labels=metadata.num_labels,
        fingerprint=fingerprint, compute_metrics=compute_metrics, accelerator=accelerator, run_info=info,
        target_stats=job["target_stats"],
    )
    started = time.perf_counter()
    results = trainer.train()
    results["train_seconds"] = round(time.perf_counter() - started, 2)
    if not results["finished"]:
        accelerator.print(f"stopped at step {results['stopped_at_step']} (stop_after_steps); resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return results

    best_step = trainer.load_best()
    validation = trainer.evaluate("validation")
    results["best_step"] = best_step
    results["validation"] = validation
    results["metric_for_best_model"] = trainer.best_metric_name
    if "test" in job["eval_loaders"]:
        results["test"] = trainer.test("test")
    if method.linear_probe:
        results["probe"] = representation_probe(args, job, trainer)
        trainer._log("probe", results["probe"])
    if accelerator.is_main_process:
        trainer.write_plots()
        accelerator.print(json.dumps({"best_step": best_step, "validation": validation, "test": results.get("test"),
                                      **({"probe": results["probe"]} if "probe" in results else {})}))

    if targs.export:
        export_run(trainer, args, metadata, source, results)
    accelerator.end_training()
    if targs.push_to_hub and accelerator.is_main_process:
        from .hub import push_folder

        commit = push_folder(output_dir, targs.hub_model_id, token=targs.hub_token, private=targs.hub_private,
                             commit_message=f"stil {targs.method} run (seed {targs.seed})")
        results["hub_commit"] = str(getattr(commit, "commit_url", commit))
    return results


def representation_probe(args, job: dict, trainer: Trainer) -> dict[str, float]:
    """For pretraining methods (``probe_features``): a linear probe on the selected encoders, fitted on
    the labelled train rows and scored on the test split (validation if none), so a user sees whether
    the representation is useful before starting STiL from it."""
    from data_utils.loaders import build_eval_loader
    from data_utils.views import ViewConfig

    metadata, dataset_dict = job["metadata"], job["dataset_dict"]
    if metadata.task != "classification" or metadata.label_column not in dataset_dict["train"].column_names:
        return {}
    labeled = labeled_indices_for(args, dataset_dict, metadata)
    method, acc = trainer.unwrapped, trainer.accelerator
    model = method.eval_model()
    view_config = ViewConfig.from_model_config(model.config, preset=args.data.view_preset, seed=args.training.seed)
    probe_data = dataset_dict.copy()
    probe_data["probe"] = dataset_dict["train"].select(labeled)
    held_out = "test" if "test" in dataset_dict else "validation"

    def features(split):
        loader = build_eval_loader(probe_data, metadata, job["schema"], split, args.training.per_device_eval_batch_size,
                                   view_config, views=dict(method.eval_views))
        xs, ys = [], []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in loader:
                batch = _move(batch, acc.device)
                xs.append(method.probe_features(model, batch).float().cpu())
                ys.append(batch["labels"].cpu())
        model.train(was_training)
        return torch.cat(xs).numpy(), torch.cat(ys).numpy()

    from .probe import linear_probe_accuracy

    x_train, y_train = features("probe")
    x_eval, y_eval = features(held_out)
    return {**linear_probe_accuracy(x_train, y_train, x_eval, y_eval), "probe_split": held_out}


def fit(recipe: str | os.PathLike | dict | None = None, **overrides) -> dict[str, Any]:
    """Train from Python (notebooks) through the same path as ``train.py``.

    ``recipe``: a recipe YAML path, a dict of recipe keys, or None (the defaults); ``overrides`` are
    recipe keys too. Returns the results dict (best step, validation and test metrics, reload check)::

        from modeling_stil.training import fit
        results = fit("recipes/fixmatch_synthetic_multimodal.yaml", max_steps=50, output_dir="runs/nb")
    """
    from .arguments import parse_run_arguments

    argv: list[str] = []
    values: dict[str, Any] = {}
    if isinstance(recipe, dict):
        values.update(recipe)
    elif recipe is not None:
        argv.append(str(recipe))
    values.update(overrides)
    args = parse_run_arguments(argv + [item for key, value in values.items() for item in (f"--{key}", _cli_value(value))])
    return build_and_train(args)


def _cli_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
