"""The run's data side, between the dataset and the method: which training rows keep their label (from
the run's arguments), the method's stream options, the training stream and evaluation loaders
(data_utils.loaders) and the `DataInfo` the method learns its sizes from in ``setup``."""

from __future__ import annotations

import os
from typing import Any

from data_utils.labeled_split import LabelRedraw, labeled_rows
from data_utils.preparation import SyntheticBuild

from .optim import schedule_lengths


def labeled_split(args, dataset_dict, metadata) -> tuple[list[int], str]:
    """(training rows that keep their label, how they were chosen, for the run's "labelled rows" line).

    The recipe's ``labeled_fraction`` is a build parameter of the synthetic dataset when no dataset is
    given (`SyntheticBuild`), and a redraw of a given dataset's labels otherwise (`LabelRedraw`, with
    ``labeled_per_class``). A recipe's value that meets a ``--dataset`` from the command line has been
    cleared by the argument parser (`arguments.keep_own_labels`), so the dataset keeps its own split."""
    data = args.data
    redraw = None
    if data.dataset is None:
        how = f"the synthetic dataset's split, built with labeled_fraction {SyntheticBuild.from_data_arguments(data).labeled_fraction:g}"
    elif data.labeled_fraction is not None or data.labeled_per_class is not None:
        redraw = LabelRedraw(data.labeled_fraction, data.labeled_per_class, seed=args.training.seed)
        how = redraw.describe()
    else:
        how = "dataset's own split"
        for key, value in (getattr(args, "unapplied", None) or {}).items():
            how += (f"; the recipe's {key} {value:g} is not applied to a --dataset: pass --{key} {value:g} on the "
                    "command line to re-draw the labels")
    return labeled_rows(dataset_dict, metadata, redraw), how


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
    eval_view_config = view_config  # evaluation views are plain resizes: always made by the loader
    if data.image_views_on_device:
        view_config = replace(view_config, views_on_device=True)
        accelerator.print(describe_device_views(method, view_config))
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
            dataset_dict, metadata, schema, split, args.training.per_device_eval_batch_size, eval_view_config,
            views=dict(method.eval_views), num_workers=num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
    if "validation" not in eval_loaders:
        raise ValueError("the dataset has no validation split: best-model selection needs one")
    if data.image_views_on_device:
        from data_utils.device_views import DeviceViews

        train_stream = DeviceViewStream(train_stream, DeviceViews(view_config), accelerator.device)
    return train_stream, eval_loaders


def describe_device_views(method, view_config) -> str:
    """One line: which training image views are made on the device and which stay on the CPU (and why)."""
    from data_utils.device_views import device_view_unsupported
    from data_utils.views import resolve_views

    on_device, on_cpu = [], []
    for views in (method.labeled_views, method.unlabeled_views, method.meta_views):
        for key, recipe in resolve_views(dict(views) if views is not None else None).items():
            if recipe.image is None:
                continue
            reason = device_view_unsupported(recipe.image, view_config)
            entry = f"{key} ({recipe.image})" if reason is None else f"{key} ({recipe.image}): {reason}"
            listed = on_device if reason is None else on_cpu
            if entry not in listed:  # the meta stream repeats the labelled stream's keys
                listed.append(entry)
    return (f"image views on the device: {', '.join(on_device) or 'none'}"
            + (f"; kept on the CPU: {'; '.join(on_cpu)}" if on_cpu else ""))


class DeviceViewStream:
    """The training stream with its image views made on the device (``--image_views_on_device``): each
    batch is planned on the host, moved and augmented on ``device`` before the loop prepares it further;
    everything else (steps_per_epoch, samplers, workers) is the wrapped stream's."""

    def __init__(self, stream, device_views, device):
        self.stream = stream
        self.device_views = device_views
        self.device = device

    def iterate(self, start_step: int = 0):
        from .batches import move_with_device_views

        for labeled, unlabeled in self.stream.iterate(start_step):
            yield (move_with_device_views(labeled, self.device, self.device_views),
                   move_with_device_views(unlabeled, self.device, self.device_views))

    def __getattr__(self, name):
        if name == "stream":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


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
