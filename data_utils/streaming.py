"""Streamed training data: Parquet shards read as they are needed, for datasets larger than a disk.

Layout (written by `write_streaming_shards`, i.e. ``scripts/prepare_dataset.py --streaming-shards N``),
in a local folder or at any fsspec URL (``s3://``, ``gs://``, ``hf://``, ...)::

    stil_dataset.json               # DatasetMetadata, as in a map-style dataset folder
    tabular_schema.json             # TabularSchema (image+tabular / tabular data)
    stil_streaming.json             # this layout: files and row counts per split and group
    train/labeled-00000-of-00004.parquet ...    # the labelled training rows, N shards
    train/unlabeled-00000-of-00004.parquet ...  # the other training rows, N shards
    validation/part-00000-of-00001.parquet      # evaluation splits (read whole: they stay map-style)
    test/part-00000-of-00001.parquet

Every row carries ``row_id`` (its row in the split before sharding: the batch's ``index`` and the
seed of its augmentation) and ``stream_position`` (its place in its group: the batch's ``position``);
training rows also carry the metadata's labeled column (bool). The labelled rows are those of the
``labeled`` shards: the labelled split is fixed when the shards are written. Rows are shuffled
(seeded) before they are cut into shards, so each shard is a random sample of its group.

Reading (`StreamingTrainStream`): each stream (labelled, unlabelled, meta) is a Hugging Face
``datasets`` IterableDataset over its group's shards. Per pass, the shard order is a permutation
seeded by (seed, stream, pass); ``datasets.distributed.split_dataset_by_node`` gives each process
its shards (disjoint shards when the shard count divides by the process count, else every process
reads every shard and keeps every ``num_processes``-th row), and ``datasets`` splits a process's
shards among its DataLoader workers. Rows are shuffled within windows of ``shuffle_window``
consecutive rows (seeded by stream, pass and window), not by ``datasets``' shuffle buffer, whose
content a checkpoint could not hold. Each worker cycles its shards forever and yields whole batches
(views made in the worker, as in data_utils.loaders); one step = one labelled batch of ``batch_size``
and one unlabelled batch of ``mu * batch_size`` per process, as in memory.

Exact resume: each batch leaves the worker with its reader's position after it: the pass, the window,
the ``IterableDataset.state_dict()`` at the window's start and the rows of the window already used.
`StreamingTrainStream.state_dict` gathers every process's positions of the last batches the trainer
took (the trainer registers the stream for checkpointing); on resume each worker reloads its
position with ``load_state_dict`` and the main process takes batches in the interrupted run's worker
order. A resume needs the same process and worker counts (refused otherwise, in one line).

Differences from the in-memory loaders: the tabular corruption pool is the batch's own rows (no whole
split is at hand); an epoch (``steps_per_epoch``, for eval/save intervals and epoch hooks) is nominal,
the rows of the unlabelled group over the global unlabelled batch; the validation/test splits are read
whole into memory (keep them small).
"""

from __future__ import annotations

import json
import math
from collections import deque
from itertools import islice
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from .io import METADATA_FILENAME, DatasetError, DatasetMetadata
from .loaders import LoaderError, ViewDataset, _label_array, _passthrough
from .schema import SCHEMA_FILENAME, TabularSchema
from .views import TabularPool, ViewConfig, base_seed, single_threaded

STREAMING_FILENAME = "stil_streaming.json"
ROW_ID_COLUMN = "row_id"
POSITION_COLUMN = "stream_position"
SHUFFLE_WINDOW = 1024
LAYOUT_VERSION = 1


# ================================================================================= writing
def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def _join(root: str, relative: str) -> str:
    return str(root).rstrip("/") + "/" + relative


def labeled_mask(train, metadata: DatasetMetadata) -> np.ndarray:
    """The train split's labelled rows: its labeled column, else metadata.labeled_indices, else all."""
    n = len(train)
    if metadata.labeled_column and metadata.labeled_column in train.column_names:
        return np.asarray(train[metadata.labeled_column], dtype=bool)
    if metadata.labeled_indices is not None:
        mask = np.zeros(n, dtype=bool)
        mask[np.asarray(metadata.labeled_indices, dtype=np.int64)] = True
        return mask
    return np.ones(n, dtype=bool)


def _write_group(fs, root: str, split, rows: np.ndarray, folder: str, group: str, num_shards: int) -> dict[str, Any]:
    """``rows`` of ``split`` as ``num_shards`` Parquet files ``folder/group-i-of-n.parquet`` (images embedded)."""
    from datasets.table import embed_table_storage

    part = split.select(rows.tolist())
    part = part.add_column(POSITION_COLUMN, np.arange(len(rows), dtype=np.int64).tolist())
    files = []
    fs.makedirs(_join(root, folder), exist_ok=True)
    for index in range(num_shards):
        shard = part.shard(num_shards, index=index, contiguous=True)
        shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True).with_format(None)
        name = f"{folder}/{group}-{index:05d}-of-{num_shards:05d}.parquet"
        with fs.open(_join(root, name), "wb") as handle:
            shard.to_parquet(handle)
        files.append(name)
    return {"files": files, "num_rows": int(len(rows))}


def write_streaming_shards(dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None, output: str,
                           num_shards: int, seed: int = 0, overwrite: bool = False) -> str:
    """Write a map-style dataset (``DatasetDict`` + metadata + schema) as the streaming layout above.

    ``num_shards`` shards per training group (labelled, unlabelled); evaluation splits get as many, at
    most one per row. Choose a multiple of (processes x DataLoader workers) so every process and worker
    reads whole shards of its own. ``output``: a local folder or an fsspec URL."""
    if num_shards < 1:
        raise DatasetError(f"--streaming-shards must be >= 1, got {num_shards}")
    if "train" not in dataset_dict:
        raise DatasetError(f"the dataset has no 'train' split to stream; splits: {list(dataset_dict.keys())}")
    fs, root = _filesystem(output)
    if fs.exists(root) and fs.ls(root):
        if not overwrite:
            raise DatasetError(f"{output} exists and is not empty; choose a new folder or pass --overwrite")
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per shard would drown the script's output
    try:
        _write_splits(fs, root, dataset_dict, metadata, schema, num_shards, seed)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return str(output)


def _write_splits(fs, root: str, dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None,
                  num_shards: int, seed: int) -> None:
    rng = np.random.default_rng(np.random.SeedSequence([base_seed(seed, "streaming-shards", "rows")]))
    layout: dict[str, Any] = {"version": LAYOUT_VERSION, "format": "parquet", "row_id_column": ROW_ID_COLUMN,
                              "position_column": POSITION_COLUMN, "labeled_column": metadata.labeled_column,
                              "num_shards": int(num_shards), "seed": int(seed), "splits": {}}
    for name, split in dataset_dict.items():
        split = split.add_column(ROW_ID_COLUMN, np.arange(len(split), dtype=np.int64).tolist())
        order = rng.permutation(len(split))
        if name == "train":
            mask = labeled_mask(split, metadata)
            if metadata.labeled_column in split.column_names:
                split = split.remove_columns(metadata.labeled_column)
            split = split.add_column(metadata.labeled_column, mask.tolist())
            groups = {}
            for group, keep in (("labeled", mask), ("unlabeled", ~mask)):
                rows = order[keep[order]]
                if 0 < len(rows) < num_shards:
                    raise DatasetError(f"the train split has {len(rows)} {group} rows, fewer than --streaming-shards "
                                       f"{num_shards}; write fewer shards")
                groups[group] = (_write_group(fs, root, split, rows, "train", group, num_shards) if len(rows)
                                 else {"files": [], "num_rows": 0})
            layout["splits"]["train"] = groups
        else:
            shards = max(1, min(num_shards, len(split)))
            layout["splits"][name] = _write_group(fs, root, split, np.sort(order), name, "part", shards)
    saved = DatasetMetadata.from_dict({**metadata.to_dict(), "labeled_indices": None})
    with fs.open(_join(root, METADATA_FILENAME), "w") as handle:
        handle.write(json.dumps(saved.to_dict(), indent=2))
    if schema is not None:
        with fs.open(_join(root, SCHEMA_FILENAME), "w") as handle:
            handle.write(json.dumps(schema.to_dict(), indent=2))
    with fs.open(_join(root, STREAMING_FILENAME), "w") as handle:  # last: its presence marks a complete folder
        handle.write(json.dumps(layout, indent=2))


# ================================================================================= reading
def is_streaming_dataset(source: str | None) -> bool:
    if not source:
        return False
    try:
        fs, root = _filesystem(source)
        return fs.isfile(_join(root, STREAMING_FILENAME))
    except Exception:  # noqa: BLE001 -- an unreachable URL is simply not a streaming folder here
        return False


class StreamingDataset:
    """A streaming folder (see the module docstring): metadata, schema, file lists and the eval splits."""

    def __init__(self, source: str):
        self.source = str(source)
        fs, root = _filesystem(source)
        self.fs, self.root = fs, root

        def read(name: str, what: str) -> dict[str, Any]:
            try:
                with fs.open(_join(root, name), "r") as handle:
                    return json.loads(handle.read())
            except FileNotFoundError:
                raise DatasetError(f"{source} has no {name} ({what}): write it with scripts/prepare_dataset.py "
                                   "--streaming-shards N") from None

        self.layout = read(STREAMING_FILENAME, "the streaming layout")
        if self.layout.get("version") != LAYOUT_VERSION:
            raise DatasetError(f"{source}: streaming layout version {self.layout.get('version')} is not "
                               f"{LAYOUT_VERSION}; write it again with this version's scripts/prepare_dataset.py")
        self.metadata = DatasetMetadata.from_dict(read(METADATA_FILENAME, "the dataset metadata"))
        self.schema = None
        if fs.isfile(_join(root, SCHEMA_FILENAME)):
            self.schema = TabularSchema.from_dict(read(SCHEMA_FILENAME, "the tabular schema"))

    def urls(self, relative: list[str]) -> list[str]:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        return [prefix + _join(self.root, name) for name in relative]

    def group(self, name: str) -> dict[str, Any]:
        return self.layout["splits"]["train"][name]

    @property
    def num_labeled(self) -> int:
        return int(self.group("labeled")["num_rows"])

    @property
    def num_unlabeled(self) -> int:
        return int(self.group("unlabeled")["num_rows"])

    def split_sizes(self) -> dict[str, int]:
        sizes = {"train": self.num_labeled + self.num_unlabeled}
        sizes.update({k: int(v["num_rows"]) for k, v in self.layout["splits"].items() if k != "train"})
        return sizes

    def labeled_row_ids(self) -> list[int]:
        """The labelled rows' ids (only that column of the labelled shards is read)."""
        import pyarrow.parquet as pq

        ids: list[int] = []
        for name in self.group("labeled")["files"]:
            with self.fs.open(_join(self.root, name), "rb") as handle:
                ids.extend(pq.read_table(handle, columns=[ROW_ID_COLUMN]).column(0).to_pylist())
        return sorted(int(i) for i in ids)

    def eval_split(self, name: str):
        """A whole evaluation split in memory (map-style ``datasets.Dataset``, features as written)."""
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for file in self.layout["splits"][name]["files"]:
            with self.fs.open(_join(self.root, file), "rb") as handle:
                tables.append(pq.read_table(handle))
        table = pa.concat_tables(tables)
        features = datasets.Features.from_arrow_schema(table.schema)
        return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))

    def eval_splits(self) -> dict[str, Any]:
        import datasets

        return datasets.DatasetDict({k: self.eval_split(k) for k in self.layout["splits"] if k != "train"})


def open_streaming_dataset(source: str) -> StreamingDataset:
    if not is_streaming_dataset(source):
        raise DatasetError(f"--streaming: {source} is not a streaming dataset folder (no {STREAMING_FILENAME}); "
                           "write one with scripts/prepare_dataset.py --streaming-shards N (or --convert DATASET)")
    return StreamingDataset(source)


# ================================================================================= one stream
class ShardStream(torch.utils.data.IterableDataset):
    """One training stream of one process: yields ``(batch, worker, position_after_batch)`` forever.

    ``start_positions[worker]`` (None: from the start) is where each worker resumes."""

    def __init__(self, files: list[str], *, stream: str, kind: str, views: Mapping[str, Any], view_config: ViewConfig,
                 metadata: DatasetMetadata, schema: TabularSchema | None, batch_size: int, num_replicas: int, rank: int,
                 shuffle_window: int = SHUFFLE_WINDOW):
        self.files = list(files)
        self.stream, self.kind = stream, kind
        self.views = dict(views)
        self.config = view_config
        self.metadata, self.schema = metadata, schema
        self.batch_size = int(batch_size)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle_window = int(shuffle_window)
        self.start_positions: list[dict | None] = []
        self._key = base_seed(view_config.seed, stream, "streaming-order")

    def reader(self, pass_number: int):
        """This process's ``datasets`` IterableDataset for one pass (shard order seeded by the pass)."""
        import datasets
        from datasets.distributed import split_dataset_by_node

        rng = np.random.default_rng(np.random.SeedSequence([self._key, int(pass_number), 0]))
        files = [self.files[i] for i in rng.permutation(len(self.files))]
        data = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        image = self.metadata.image_column
        if image is not None and image in (data.features or {}):
            data = data.cast_column(image, datasets.Image(decode=False))
        return split_dataset_by_node(data, rank=self.rank, world_size=self.num_replicas)

    def __iter__(self) -> Iterator[tuple[dict, int, dict]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        start = self.start_positions[worker] if worker < len(self.start_positions) else None
        start = start or {"pass": 0, "window": 0, "state": None, "offset": 0}
        pass_number, window_index, state, offset = start["pass"], start["window"], start["state"], start["offset"]
        pending: list[tuple[dict, int]] = []
        while True:
            reader = self.reader(pass_number)
            fresh_pass = state is None and window_index == 0 and offset == 0
            if state is not None:
                reader.load_state_dict(state)
            rows = iter(reader)
            read_any = False
            while True:
                window = list(islice(rows, self.shuffle_window))
                if not window:
                    break
                read_any = True
                after = reader.state_dict()
                order = np.random.default_rng(
                    np.random.SeedSequence([self._key, int(pass_number), int(window_index) + 1])).permutation(len(window))
                for j in range(offset, len(window)):
                    pending.append((window[order[j]], pass_number))
                    if len(pending) == self.batch_size:
                        position = {"pass": pass_number, "window": window_index, "state": state, "offset": j + 1}
                        yield self.make_batch(pending), worker, position
                        pending = []
                state, offset, window_index = after, 0, window_index + 1
            if fresh_pass and not read_any:
                raise LoaderError(
                    f"process {self.rank} (worker {worker}) got no row of the {self.stream} stream's "
                    f"{len(self.files)} shard(s); write more shards (a multiple of processes x workers) or use fewer "
                    "DataLoader workers")
            pass_number, window_index, state, offset = pass_number + 1, 0, None, 0

    def make_batch(self, examples: list[tuple[dict, int]]) -> dict[str, Any]:
        """The rows (with their pass numbers) through the stream's views, as data_utils.loaders makes them."""
        rows = [e for e, _ in examples]
        passes = [p for _, p in examples]
        metadata, n = self.metadata, len(rows)
        values = {k: [r.get(k) for r in rows] for k in rows[0]}
        labels = _label_array(values.get(metadata.label_column, [None] * n), metadata.task, metadata.num_targets)
        tabular = pool = None
        if self.schema is not None:
            tabular = self.schema.encode_columns({name: values[name] for name in self.schema.names})
            pool = TabularPool.from_arrays(tabular)  # the batch's rows: no whole split is at hand
        image = metadata.image_column
        table = _BatchColumn(image, values[image]) if image is not None and image in values else _BatchColumn("_", [0] * n)
        dataset = ViewDataset(table, metadata, self.views, self.config, np.arange(n), kind=self.kind,
                              stream=self.stream, labels=labels, tabular=tabular, pool=pool)
        dataset.row_ids = np.asarray(values[ROW_ID_COLUMN], dtype=np.int64)
        dataset.stream_positions = np.asarray(values[POSITION_COLUMN], dtype=np.int64)
        with single_threaded():
            return dataset._batch([(i, p) for i, p in enumerate(passes)])


class _BatchColumn:
    """A batch's stored image values (``{"bytes", "path"}``, undecoded) where `ViewDataset` reads a split's
    image column (``column_names``, ``select_columns``, ``features``, ``[rows][column]``): a
    ``datasets.Dataset`` built per batch would cost a quarter of the loader's time."""

    def __init__(self, column: str, values: list):
        self.column, self.values = column, values
        self.column_names = [column]
        self.features = {column: None}  # already undecoded: nothing to cast

    def select_columns(self, names):
        return self

    def __getitem__(self, rows):
        return {self.column: [self.values[i] for i in rows]}


class _StreamCursor:
    """The main process's side of one stream: its DataLoader, the workers' positions after the batches
    taken, and which worker's batch comes next (the DataLoader serves workers round-robin)."""

    def __init__(self, dataset: ShardStream, num_workers: int, pin_memory: bool, prefetch_factor: int | None):
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.positions: list[dict | None] = [None] * max(1, self.num_workers)
        self.next_worker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "next_worker": self.next_worker, "positions": list(self.positions)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.positions = list(state["positions"])
        self.next_worker = int(state["next_worker"])

    def batches(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        self.dataset.start_positions = list(self.positions)
        extra = {}
        if self.num_workers > 0:
            extra = dict(persistent_workers=True, prefetch_factor=self.prefetch_factor or 2)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0), **extra)
        served = iter(loader)
        held: dict[int, deque] = {}
        workers = max(1, self.num_workers)
        while True:
            waiting = held.get(self.next_worker)
            if waiting:
                batch, worker, position = waiting.popleft()
            else:
                while True:
                    batch, worker, position = next(served)
                    if worker == self.next_worker:
                        break
                    held.setdefault(worker, deque()).append((batch, worker, position))
            self.positions[worker] = position
            self.next_worker = (worker + 1) % workers
            yield batch


# ================================================================================= the run's streams
class StreamingTrainStream:
    """The labelled (and unlabelled, and meta) streams of one process over a `StreamingDataset`; the
    trainer's stream interface (``iterate``, ``steps_per_epoch``) plus ``state_dict``/``load_state_dict``."""

    def __init__(self, data: StreamingDataset, *, labeled_views=None, unlabeled_views=None, meta_views=None,
                 view_config: ViewConfig | None = None, batch_size: int = 64, mu: int = 7, seed: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = 2,
                 num_replicas: int = 1, rank: int = 0, unlabeled_includes_labeled: bool = False,
                 label_free: bool = False, meta_batch_size: int | None = None, epoch: str = "unlabeled",
                 shuffle_window: int = SHUFFLE_WINDOW):
        from dataclasses import replace

        view_config = view_config or ViewConfig()
        if seed is not None and seed != view_config.seed:
            view_config = replace(view_config, seed=int(seed))
        if batch_size < 1 or mu < 0:
            raise LoaderError(f"batch_size must be >= 1 and mu >= 0, got {batch_size} and {mu}")
        self.data, self.metadata, self.config = data, data.metadata, view_config
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        labeled_files = data.urls(data.group("labeled")["files"])
        all_files = labeled_files + data.urls(data.group("unlabeled")["files"])
        if label_free:
            labeled_views = meta_views = None
            unlabeled_includes_labeled = True
        self.label_free = label_free
        self.num_labeled = 0 if label_free else data.num_labeled
        self.num_train = data.num_labeled + data.num_unlabeled
        self.num_unlabeled = self.num_train if unlabeled_includes_labeled else data.num_unlabeled
        self.labeled_batch_size = int(batch_size) if labeled_views else 0
        self.unlabeled_batch_size = (int(batch_size) if label_free else int(mu * batch_size)) if unlabeled_views else 0
        self.meta_batch_size = int(meta_batch_size or batch_size) if meta_views and labeled_views else 0
        common = dict(view_config=view_config, metadata=data.metadata, schema=data.schema, num_replicas=num_replicas,
                      rank=rank, shuffle_window=shuffle_window)
        self.cursors: dict[str, _StreamCursor] = {}
        labeled_workers = num_workers if num_workers == 0 or not unlabeled_views else max(1, math.ceil(num_workers / (1 + mu)))

        def add(name, files, views, kind, batch, workers, rows):
            if batch * num_replicas > rows:
                raise LoaderError(f"the {name} batch of {batch} x {num_replicas} process(es) exceeds the {rows} {name} "
                                  "rows of the streamed dataset; lower the batch size (or mu)")
            # at most one worker per shard of this process (a worker without a shard would have no rows)
            per_process = len(files) // num_replicas if len(files) % num_replicas == 0 else len(files)
            workers = min(workers, per_process)
            dataset = ShardStream(files, stream=name, kind=kind, views=views, batch_size=batch, **common)
            self.cursors[name] = _StreamCursor(dataset, workers, pin_memory, prefetch_factor)

        if labeled_views:
            if self.num_labeled == 0:
                raise LoaderError("the streamed dataset has no labelled row (its train/labeled shards are empty)")
            add("labeled", labeled_files, labeled_views, "labeled", self.labeled_batch_size, labeled_workers, self.num_labeled)
            if meta_views:
                add("meta", labeled_files, meta_views, "labeled", self.meta_batch_size, labeled_workers, self.num_labeled)
        if unlabeled_views:
            if self.unlabeled_batch_size < 1:
                raise LoaderError("mu must be >= 1 when the method has unlabelled views")
            files = all_files if unlabeled_includes_labeled else data.urls(data.group("unlabeled")["files"])
            if self.num_unlabeled == 0:
                raise LoaderError("the method needs unlabelled data but the streamed dataset's train/unlabeled shards are "
                                  "empty; write the shards with a labelled fraction < 1")
            add("unlabeled", files, unlabeled_views, "unlabeled", self.unlabeled_batch_size, num_workers, self.num_unlabeled)
        if not self.cursors:
            raise LoaderError("the method has neither labelled nor unlabelled views")
        # nominal passes: a stream has no exact per-process length (shards differ in size)
        passes = {"labeled": self.num_labeled // max(1, self.labeled_batch_size * num_replicas),
                  "unlabeled": self.num_unlabeled // max(1, self.unlabeled_batch_size * num_replicas)}
        passes = {k: v for k, v in passes.items() if k in self.cursors}
        self.steps_per_epoch = max(1, max(passes.values()) if epoch == "longest" else
                                   passes.get("unlabeled", passes.get("labeled", 1)))
        self.steps_taken = 0
        self._open_streams: list[Iterator] = []
        self._close_registered = False

    def close(self) -> None:
        """Stop the readers (and DataLoader workers) of the last ``iterate``."""
        for stream in self._open_streams:
            stream.close()
        self._open_streams = []

    # the stream state a checkpoint holds ------------------------------------------------------
    def local_state(self) -> dict[str, Any]:
        return {"steps": self.steps_taken, "num_replicas": self.num_replicas,
                "streams": {name: cursor.state_dict() for name, cursor in self.cursors.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Every process's stream positions (collective: every process calls it, as ``save_state`` does)."""
        from accelerate.utils import gather_object

        local = self.local_state()
        processes = gather_object([local]) if self.num_replicas > 1 else [local]
        return {"version": LAYOUT_VERSION, "processes": processes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        processes = state["processes"]
        mine = processes[self.rank] if len(processes) == self.num_replicas else None
        workers = {n: c.num_workers for n, c in self.cursors.items()}
        saved_workers = {n: s["num_workers"] for n, s in (mine or processes[0])["streams"].items()}
        if mine is None or saved_workers != workers:
            raise LoaderError(
                f"the checkpoint's streamed-data positions are for {len(processes)} process(es) with DataLoader workers "
                f"{saved_workers}; this run has {self.num_replicas} with {workers}: resume with the same --num_processes "
                "and --dataloader_num_workers")
        for name, cursor in self.cursors.items():
            cursor.load_state_dict(mine["streams"][name])
        self.steps_taken = int(mine["steps"])

    # iteration -------------------------------------------------------------------------------
    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def iterate(self, start_step: int = 0) -> Iterator[tuple[dict, dict | None]]:
        """``(labeled, unlabeled)`` for steps start_step, ... forever; ``start_step`` must be where the
        loaded state (``load_state_dict``) stopped: a stream cannot skip rows it has not read."""
        if start_step != self.steps_taken:
            raise LoaderError(
                f"streamed data cannot start at step {start_step}: its positions are those after step {self.steps_taken}; "
                "resume from a checkpoint written with --streaming (it holds the stream positions)")
        self.close()
        streams = {name: cursor.batches() for name, cursor in self.cursors.items()}
        self._open_streams = list(streams.values())
        if not self._close_registered:  # readers closed while pyarrow is alive, not at interpreter teardown
            import atexit

            atexit.register(self.close)
            self._close_registered = True
        while True:
            labeled = next(streams["labeled"]) if "labeled" in streams else None
            if "meta" in streams:
                labeled["meta"] = next(streams["meta"])
            unlabeled = next(streams["unlabeled"]) if "unlabeled" in streams else None
            self.steps_taken += 1
            yield labeled, unlabeled
