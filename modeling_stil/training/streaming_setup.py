"""The run's data side with ``--streaming`` (data_utils.streaming): what `job.assemble` builds from a
streamed dataset folder instead of a map-style one, and the settings that cannot work with it, refused
at start-up in one line (`check_streaming_arguments`)."""

from __future__ import annotations

import os

from .errors import JobError
from .optim import schedule_lengths


def check_streaming_arguments(args, method_cls) -> None:
    """Refuse what a stream cannot do: no length to count epochs over, no whole split to redraw labels
    from, to decode up front or to fit a probe on."""
    data, targs = args.data, args.training
    problems = [
        (data.dataset is None, "--streaming needs --dataset: a folder or fsspec URL written by "
                               "scripts/prepare_dataset.py --streaming-shards N"),
        (targs.max_steps == -1, "--streaming needs --max_steps: a stream has no length to count num_train_epochs over"),
        (data.labeled_fraction is not None or data.labeled_per_class is not None,
         "--streaming reads the labelled split written into the shards (train/labeled-*.parquet); drop "
         "--labeled_fraction/--labeled_per_class, or write the shards again with prepare_dataset --labeled-fraction"),
        (data.standardize_targets, "--standardize_targets is not available with --streaming (no whole labelled set "
                                   "is read up front); drop it"),
        (data.bad_images == "skip", "--bad_images skip is not available with --streaming (images are decoded as they "
                                    "are read, never up front); repair the data or drop the option"),
        (data.image_views_on_device, "--image_views_on_device is not available with --streaming yet; drop it"),
        (method_cls.linear_probe, f"--method {targs.method}: its linear probe reads the whole train split, "
                                                 "which --streaming never loads; train it without --streaming"),
    ]
    for refused, message in problems:
        if refused:
            raise JobError(message)


class _StreamedSplit:
    """A streamed split's size, where the job records split sizes (fingerprint, run_info)."""

    def __init__(self, num_rows: int):
        self.num_rows = int(num_rows)

    def __len__(self) -> int:
        return self.num_rows


def assemble_streaming(args, accelerator):
    """`job.assemble` for a streamed dataset: the same dict (``dataset_dict`` holds the in-memory
    validation/test splits and the train split's size)."""
    from accelerate.utils import set_seed

    from data_utils.loaders import build_eval_loader, resolve_num_workers
    from data_utils.streaming import StreamingTrainStream, open_streaming_dataset
    from data_utils.views import ViewConfig, preset_for_task

    from ..methods.base import DataInfo, get_method_class
    from .data_setup import stream_options
    from .model_setup import build_model, initialise_from

    targs, data = args.training, args.data
    method_cls = get_method_class(targs.method)
    check_streaming_arguments(args, method_cls)
    streamed = open_streaming_dataset(data.dataset)
    metadata, schema = streamed.metadata, streamed.schema
    method_cls.check_task(metadata.task)
    labeled = [] if method_cls.label_free else streamed.labeled_row_ids()
    sizes = streamed.split_sizes()
    if not method_cls.label_free:
        accelerator.print(f"labelled rows: {len(labeled)} of {sizes['train']} (the streamed shards' split)")
    if schema is not None:
        accelerator.print("note: --streaming: tabular corruption draws replacement values from each batch's own rows "
                          "(no whole train split is read)")
    set_seed(targs.seed)
    model = build_model(args, schema, metadata, method_cls, say=accelerator.print)
    init_report = initialise_from(model, args.model.init_from, say=accelerator.print) if args.model.init_from else None
    try:
        method = method_cls(model, args.method)
    except ValueError as error:
        raise JobError(str(error)) from None

    options = stream_options(args, method)
    preset = preset_for_task(data.view_preset, metadata.task)
    view_config = ViewConfig.from_model_config(model.config, preset=preset, seed=targs.seed, hflip=data.hflip)
    if options["augmentation_rate"] is not None:
        from dataclasses import replace

        view_config = replace(view_config, augmentation_rate=float(options["augmentation_rate"]))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes)
    num_workers = resolve_num_workers(data.dataloader_num_workers, local_processes, accelerator.device.type)
    pin_memory = accelerator.device.type == "cuda"
    views = lambda v: dict(v) if v is not None else None  # noqa: E731
    train_stream = StreamingTrainStream(
        streamed, labeled_views=views(method.labeled_views), unlabeled_views=views(method.unlabeled_views),
        meta_views=views(method.meta_views), label_free=method.label_free, view_config=view_config,
        batch_size=targs.per_device_train_batch_size, mu=data.mu, seed=targs.seed, num_workers=num_workers,
        pin_memory=pin_memory, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        unlabeled_includes_labeled=bool(options["unlabeled_includes_labeled"]), epoch=options["epoch"],
    )
    eval_splits = streamed.eval_splits()
    if "validation" not in eval_splits:
        raise JobError(f"{data.dataset} has no validation split: best-model selection needs one")
    eval_loaders = {}
    for split in ("validation", "test"):
        if split not in eval_splits:
            continue
        if data.max_eval_samples is not None and len(eval_splits[split]) > data.max_eval_samples:
            eval_splits[split] = eval_splits[split].select(range(data.max_eval_samples))
        eval_loaders[split] = build_eval_loader(
            eval_splits, metadata, schema, split, targs.per_device_eval_batch_size, view_config,
            views=dict(method.eval_views), num_workers=num_workers, pin_memory=pin_memory)

    steps_per_epoch, max_steps = schedule_lengths(targs, train_stream.steps_per_epoch)
    method.setup(DataInfo(
        num_labeled=train_stream.num_labeled, num_unlabeled=train_stream.num_unlabeled,
        num_train=train_stream.num_train, split_sizes=sizes,
        labeled_batch_size=train_stream.labeled_batch_size, unlabeled_batch_size=train_stream.unlabeled_batch_size,
        meta_batch_size=train_stream.meta_batch_size, num_processes=accelerator.num_processes,
        gradient_accumulation_steps=targs.gradient_accumulation_steps, mixed_precision=str(accelerator.mixed_precision),
        task=metadata.task, num_labels=metadata.num_labels, steps_per_epoch=steps_per_epoch, max_steps=max_steps,
        unlabeled_includes_labeled=train_stream.num_unlabeled == train_stream.num_train,
    ))
    if args.model.init_from:
        method_report = method.init_from_pretrained(args.model.init_from)
        init_report["method_state"] = method_report
    dataset_dict = {"train": _StreamedSplit(sizes["train"]), **eval_splits}
    return {
        "source": data.dataset, "dataset_dict": dataset_dict, "metadata": metadata, "schema": schema,
        "labeled": labeled, "model": model, "method": method, "train_stream": train_stream,
        "eval_loaders": eval_loaders, "target_stats": None, "init_report": init_report,
    }
