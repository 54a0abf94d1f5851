"""Job assembly: from parsed run arguments to a trained, selected, tested and exported model.

``build_and_train(args)`` is what ``train.py`` runs; ``fit(recipe_or_dict, **overrides)`` is the same
path for notebooks. Read top to bottom: `assemble` (dataset, labelled split, model, method, loaders),
`run_fingerprint` and `run_info` (what a checkpoint and run_info.json record), `build_and_train` (run
folder checks, resume preflight, run files, `Trainer`, selection, test, export, upload), then the
representation probe of pretraining methods. The pieces live in data_utils (preparation,
labeled_split, fingerprint) and in data_setup.py, model_setup.py, run_folder.py, resume.py,
provenance.py, trainer.py and export.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from data_utils.fingerprint import dataset_fingerprint
from data_utils.labeled_split import apply_labeled_split, labeled_target_stats
from data_utils.preparation import prepare_dataset

from . import checkpointing as ckpt
from . import manifest
from .accelerator import make_accelerator, whole_parameters
from .batches import move_to_device
from .errors import JobError
from .data_setup import build_loaders, data_info, labeled_split
from .export import Selection, export_run
from .model_setup import build_model, initialise_from
from .provenance import library_versions, source_commit
from .resume import preflight_resume
from .run_folder import adopt_unlisted_run, check_output_dir, clean_output_dir, tracker_run_name, write_run_files
from .tracking import resolve_trackers, tracker_config
from .trainer import Trainer


def assemble(args, accelerator):
    """Dataset, labelled split, model (+ ``--init_from``), method (+ ``setup``) and loaders.

    Returns a dict with every piece the loop and the export need."""
    from accelerate.utils import set_seed

    from ..methods.base import get_method_class

    targs = args.training
    if args.data.streaming:  # Parquet shards read as needed (data_utils.streaming), never loaded whole
        from .streaming_setup import assemble_streaming

        return assemble_streaming(args, accelerator)
    source, dataset_dict, metadata, schema = prepare_dataset(args.data, accelerator)
    method_cls = get_method_class(targs.method)
    method_cls.check_task(metadata.task)
    labeled = []
    if not method_cls.label_free:
        labeled, how = labeled_split(args, dataset_dict, metadata)
        accelerator.print(f"labelled rows: {len(labeled)} of {len(dataset_dict['train'])} ({how})")
    set_seed(targs.seed)
    model = build_model(args, schema, metadata, method_cls, say=accelerator.print)
    init_report = initialise_from(model, args.model.init_from, say=accelerator.print) if args.model.init_from else None
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


def run_fingerprint(targs, job: dict) -> dict[str, Any]:
    """What a checkpoint of this run must match to be resumed: method, architecture, dataset description."""
    schema = job["schema"]
    fingerprint = ckpt.make_fingerprint(targs.method, job["model"].config.to_dict(), dataset_fingerprint(
        job["source"], job["dataset_dict"], job["metadata"], schema, job["labeled"]))
    # recorded by value (outside the digest, so older checkpoints still resume): a refused resume names the column
    fingerprint["dataset_description"]["vocabularies"] = (
        {f.name: list(f.categories) for f in schema.categorical_fields} if schema is not None else {})
    return fingerprint


def run_info(args, job: dict, accelerator, fingerprint: dict[str, Any], resume: dict[str, Any] | None) -> dict[str, Any]:
    """What run_info.json records: data, labelled rows, processes, versions, commit, fingerprint, init, resume."""
    metadata, dataset_dict = job["metadata"], job["dataset_dict"]
    info = {
        "seed": args.training.seed,
        "dataset": job["source"],
        "task": metadata.task,
        "num_labels": metadata.num_labels,
        "labeled_indices": job["labeled"],
        "split_sizes": {k: len(v) for k, v in dataset_dict.items()},
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,  # MULTI_CPU (DDP over gloo), FSDP, MULTI_GPU, ...
        "dataloader_num_workers": job["train_stream"].num_workers,  # what "auto" resolved to
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": library_versions(),
        "git_commit": source_commit(),
        "fingerprint": fingerprint,
        "init_from": args.model.init_from,
        "init_report": job["init_report"],
    }
    if resume is not None:
        info["resumed_from"] = resume["checkpoint"]
        info["changed_on_resume"] = resume["changed_settings"]
    return info


def build_and_train(args) -> dict[str, Any]:
    """The whole job: data, model, method, loop, selection, test, export (+ reload check, upload)."""
    from accelerate.utils import set_seed

    from .metrics import compute_metrics

    targs = args.training
    check_output_dir(targs)
    resume = preflight_resume(args)  # settings, method, dataset content: before anything is built or written
    accelerator = make_accelerator(args)
    output_dir = Path(targs.output_dir)
    set_seed(targs.seed)

    job = assemble(args, accelerator)
    metadata, method = job["metadata"], job["method"]
    fingerprint = run_fingerprint(targs, job)
    if resume is not None:  # the whole fingerprint (architecture, labelled split) before run files are rewritten
        ckpt.check_compatible(resume["checkpoint"], fingerprint)
        if accelerator.is_main_process and manifest.read(output_dir) is None:
            adopt_unlisted_run(targs)
    elif targs.overwrite_output_dir and accelerator.is_main_process and output_dir.exists():
        clean_output_dir(output_dir)  # only the paths its manifest lists; validated by check_output_dir
    accelerator.wait_for_everyone()
    info = run_info(args, job, accelerator, fingerprint, resume)
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
    evaluation = trainer.evaluate("validation")
    validation = evaluation.metrics
    results["best_step"] = best_step
    results["validation"] = validation
    results["metric_for_best_model"] = trainer.best_metric_name
    if "test" in job["eval_loaders"]:
        results["test"] = trainer.test("test")
    if method.linear_probe:
        results["probe"] = representation_probe(args, job, trainer)
        trainer.log_metrics("probe", results["probe"])
    if accelerator.is_main_process:
        trainer.write_plots(evaluation.predictions)
        accelerator.print(json.dumps({"best_step": best_step, "validation": validation, "test": results.get("test"),
                                      **({"probe": results["probe"]} if "probe" in results else {})}))

    if targs.export:
        unlabeled_batch = None
        if trainer.unwrapped.unlabeled_views is not None:
            unlabeled_batch = args.data.mu * targs.per_device_train_batch_size * accelerator.num_processes
        state_dict = trainer.export_state_dict()  # every process (collective under FSDP)
        export_run(
            trainer.unwrapped.eval_model(), state_dict, args=args, metadata=metadata, source=job["source"],
            results=results, run_info=info, accelerator=accelerator, unlabeled_batch=unlabeled_batch,
            selection=Selection(trainer.best_metric_name, trainer.greater_is_better, best_step, trainer.progress.step),
            evaluate=lambda split, model: trainer.evaluate(split, model=model).metrics,
            check_split="test" if "test" in job["eval_loaders"] else "validation",
        )
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
    labeled = labeled_split(args, dataset_dict, metadata)[0]
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
        with torch.no_grad(), whole_parameters(trainer.method):  # FSDP2: gathered outside the prepared forward
            for batch in loader:
                batch = move_to_device(batch, acc.device)
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
