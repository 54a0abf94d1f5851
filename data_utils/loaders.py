"""Loaders: labelled/unlabelled training streams (ratio mu), exact-resume iteration, eval loaders.

What the trainer calls::

    loaders = build_train_loaders(dataset_dict, metadata, schema,
                                  labeled_views=method.labeled_views, unlabeled_views=method.unlabeled_views,
                                  view_config=ViewConfig.from_model_config(model.config, preset="dvm", seed=seed),
                                  batch_size=64, mu=7, num_workers=4, pin_memory=True,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    for step, (labeled, unlabeled) in enumerate(loaders.iterate(start_step), start=start_step):
        epoch = step // loaders.steps_per_epoch
        ...                                    # stop at max_steps: iterate() never ends
    val = loaders.build_eval_loader("validation", batch_size=256)

Semantics (docs/architecture.md, "Loaders"; docs/methods.md, "stil"):

* Labelled rows: the train split's ``labeled`` column (``metadata.labeled_column``); without it,
  ``metadata.labeled_indices``; without either, every train row (fully supervised).
* Unlabelled pool: by default the train rows *not* labelled (the STiL/Match protocol);
  ``unlabeled_includes_labeled=True`` uses every train row (L2I's AFLW protocol, docs/data.md).
* One step = one labelled batch of ``batch_size`` and one unlabelled batch of ``mu * batch_size`` per
  process. One epoch = one pass over the unlabelled pool (``steps_per_epoch`` batches); the labelled
  stream cycles on its own, with a fresh shuffle each pass. A method without unlabelled views gets
  ``unlabeled=None`` and an epoch is one pass over the labelled rows.
* Sampling is ours (`ShardedBatchSampler`): each pass is a permutation seeded by (seed, stream, pass);
  process ``rank`` of ``num_replicas`` takes every ``num_replicas``-th element of it, so processes
  never overlap and together cover the pass. Training drops the incomplete last global batch
  (``drop_last=True``; the originals did not, which gave DVM 1 % a one-sample labelled batch).
  Batch ``j`` of pass ``p`` is a pure function of (seed, p, j), and augmentation is seeded per sample
  (views.py), so ``iterate(start_step)`` resumes onto exactly the batches an uninterrupted run sees
  without loading the skipped ones, whatever ``num_workers``.
* Do **not** pass these training loaders through ``accelerator.prepare`` (they are already sharded);
  move batches with ``accelerate.utils.send_to_device``. The eval loader is rank-agnostic and
  sequential: prepare it (Accelerate shards it) and use ``gather_for_metrics``, or give
  ``num_replicas``/``rank`` here and gather yourself.

Batches (the batch contract)::

    labeled   = {"labels", "index", "position", <view key>: inputs, ...}
    unlabeled = {"monitor_labels", "index", "position", <view key>: inputs, ...}
    eval      = {"labels", "index", "eval": inputs}

``index`` is the row in the split; ``position`` the row's place in its stream (0..num_labeled-1 for
the labelled stream: banks of labelled-set size index with it). ``inputs`` holds ``pixel_values``
(float, normalised) for image data and ``categorical_values``/``continuous_values``/``missing_mask``
for tabular data; ``translate`` views add ``translation`` (B, 2) = (tx, ty) pixels and, for
landmarks, their moved ``labels``; ``masked`` views add ``masked_fields``. With
``ViewConfig(views_on_device=True)`` a view whose image view data_utils.device_views ports carries the
resized uint8 ``pixel_values`` and ``device_view`` = ``{"view", "seeds"[, "augment"]}`` instead, until
``DeviceViews.prepare`` makes the view on the accelerator and restores the contract. Landmark targets are given
in the pixel frame of the ``image_size`` x ``image_size`` model input (stored coordinates scaled by
image_size / stored size). ``monitor_labels`` are -1 (classification) / NaN (regression) where the
dataset has no ground truth.
"""

from __future__ import annotations

import io
import math
from itertools import count
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .device_views import BATCH_KEY as DEVICE_VIEW_KEY
from .device_views import device_view_request, device_view_unsupported
from .io import DatasetMetadata
from .schema import TabularSchema
from .splits import SplitError, check_labeled_split
from .views import (
    TabularPool,
    ViewConfig,
    ViewError,
    ViewRecipe,
    apply_image_view,
    base_seed,
    build_image_view,
    joint_coins,
    joint_probability,
    normalize_batch,
    resolve_views,
    sample_seeds,
    single_threaded,
)


class LoaderError(ValueError):
    """The data cannot feed the requested loaders; the message says why and what to change."""


# ================================================================================= sampling
class ShardedBatchSampler:
    """Deterministic, rank-aware batch sampler over ``num_items`` stream positions.

    Yields lists of ``(position, pass)`` keys. Pass ``p`` is a permutation seeded by
    ``(seed, stream, p)`` (identity when ``shuffle=False``); rank ``r`` takes elements ``r, r+R, ...``.
    With ``drop_last`` only complete global batches (``batch_size * num_replicas``) are used; without
    it the pass is padded by wrapping (``num_replicas > 1`` only) so every rank has as many batches.
    ``infinite``: iterate passes forever starting at ``start_step``; else one pass (len() works).
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, stream: str = "", shuffle: bool = True,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0, infinite: bool = True):
        if batch_size < 1:
            raise LoaderError(f"batch size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise LoaderError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = stream
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.infinite = infinite
        self.start_step = 0
        self._stream_key = base_seed(seed, stream, "permutation")
        self._cached: tuple[int, np.ndarray] | None = None
        global_batch = self.batch_size * self.num_replicas
        if drop_last:
            self.batches_per_pass = self.num_items // global_batch
            self._shard_length = self.batches_per_pass * self.batch_size
        else:
            self._shard_length = math.ceil(self.num_items / self.num_replicas)
            self.batches_per_pass = math.ceil(self._shard_length / self.batch_size)

    def shard(self, pass_number: int) -> np.ndarray:
        """This rank's positions for pass ``pass_number``, in order."""
        if self._cached is not None and self._cached[0] == pass_number:
            return self._cached[1]
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self._stream_key, int(pass_number)]))
            order = rng.permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        total = self._shard_length * self.num_replicas
        if total > order.size:  # pad by wrapping (not drop_last, several replicas)
            order = np.resize(order, total)
        shard = order[:total][self.rank::self.num_replicas]
        self._cached = (pass_number, shard)
        return shard

    def batch(self, step: int) -> list[tuple[int, int]]:
        """Keys of batch ``step`` counted from the first batch of pass 0."""
        if self.batches_per_pass == 0:
            raise LoaderError("this sampler has no batch (see batches_per_pass)")
        pass_number, j = divmod(int(step), self.batches_per_pass)
        positions = self.shard(pass_number)[j * self.batch_size:(j + 1) * self.batch_size]
        return [(int(p), pass_number) for p in positions]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.infinite:
            for step in count(self.start_step):
                yield self.batch(step)
        else:
            for j in range(self.batches_per_pass):
                yield self.batch(j)

    def __bool__(self) -> bool:  # never fall back on __len__ (infinite samplers have none)
        return True

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite sampler has no length; use batches_per_pass")
        return self.batches_per_pass


# ================================================================================= decoding
_RESIZE_NOTICE_GIVEN = False


def _resize_notice(stored: tuple[int, int], size: int) -> None:
    """Say once per process that stored images are resized to the model's input size."""
    global _RESIZE_NOTICE_GIVEN
    if _RESIZE_NOTICE_GIVEN:
        return
    _RESIZE_NOTICE_GIVEN = True
    import warnings

    warnings.warn(
        f"stored images of {stored[0]}x{stored[1]} pixels are resized to the model's {size}x{size} input "
        "(said once; build the dataset at that size, or choose a model with image_size matching the data, to avoid it)",
        stacklevel=3,
    )


def open_stored_image(value: Any):
    """A stored image value (``{"bytes", "path"}``, bytes, a path or a PIL image) -> a lazy PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        return Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    raise LoaderError(f"cannot decode an image from a {type(value).__name__} (is the image missing?)")


def decode_image(value: Any, num_channels: int, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Stored image (``{"bytes", "path"}``, PIL image or path) -> (uint8 (C, H, W), stored (w, h)).

    With ``size``, the image is resized to ``size`` x ``size`` right here in PIL (JPEGs decode at a
    reduced DCT scale first when they are at least twice too large), so views start small.
    """
    from PIL import Image

    from .images import scaled_notice, to_8bit

    image = open_stored_image(value)
    stored_size = image.size
    mode = "RGB" if num_channels == 3 else "L"
    if size is not None and image.format == "JPEG":
        image.draft(mode, (size, size))
    image, scaled = to_8bit(image)  # convert() would clip 16-bit pixels at 255
    if scaled:
        scaled_notice("the dataset")
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size, size):
        _resize_notice(stored_size, size)
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    array = np.array(image, dtype=np.uint8)  # owns its memory: safe for torch.from_numpy
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor, stored_size


# ================================================================================= dataset
def _label_array(values: list, task: str, num_targets: int | None) -> np.ndarray:
    """Stored labels -> numpy: int64 with -1 for missing (classification), float32 with NaN else."""
    if task == "classification":
        return np.asarray([-1 if v is None else int(v) for v in values], dtype=np.int64)
    if task == "landmarks" or (values and any(isinstance(v, (list, tuple, np.ndarray)) for v in values)):
        width = num_targets or next((len(v) for v in values if v is not None), 0)
        out = np.full((len(values), width), np.nan, dtype=np.float32)
        for i, v in enumerate(values):
            if v is not None:
                if len(v) != width:
                    raise LoaderError(f"row {i}: label has {len(v)} values, expected {width}")
                out[i] = np.asarray(v, dtype=np.float32)
        return out
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float32)


def _column(split, name: str) -> list:
    """A whole column as a Python list, honouring any indices mapping of the split."""
    return split.select_columns([name])[0:len(split)][name]


def encode_split_tabular(split, schema: TabularSchema, where: str) -> dict[str, np.ndarray]:
    """Model arrays of a whole split (encoded once; batches index into them)."""
    schema.check_columns(split.column_names, where=where)
    columns = split.select_columns(schema.names)[0:len(split)]
    return schema.encode_columns(columns)


class ViewDataset(Dataset):
    """Rows of one split seen through a set of views; fetched a whole batch at a time.

    ``__getitems__`` receives the sampler's ``(position, pass)`` keys and returns the finished batch
    (decode once per sample, every view, tabular slicing and normalisation vectorised), so the
    DataLoader's collate is a pass-through.

    Streamed batches (data_utils.streaming) build one over the batch's own rows and set ``row_ids``
    (the rows' ids in their split: ``index`` and the augmentation seeds) and ``stream_positions``
    (their places in their stream: ``position``); None: the split's rows and the sampler's positions.
    """

    row_ids: np.ndarray | None = None
    stream_positions: np.ndarray | None = None

    def __init__(self, split, metadata: DatasetMetadata, views: Mapping[str, str | ViewRecipe],
                 view_config: ViewConfig, rows: np.ndarray, *, kind: str, stream: str,
                 labels: np.ndarray, tabular: dict[str, np.ndarray] | None, pool: TabularPool | None):
        if kind not in ("labeled", "unlabeled", "eval"):
            raise ValueError(f"kind must be labeled, unlabeled or eval, got {kind!r}")
        self.kind = kind
        self.stream = stream
        self.metadata = metadata
        self.config = view_config
        self.rows = np.asarray(rows, dtype=np.int64)
        self.views = resolve_views(views)
        if not self.views:
            raise LoaderError(f"the {kind} loader was given no views")
        self.landmarks = metadata.task == "landmarks"
        self.labels = labels
        self.tabular = tabular
        self.pool = pool
        self.image_column = metadata.image_column
        self.image_views = {}
        self.device_views: dict[str, str] = {}  # view key -> image view made on the device (device_views)
        if self.image_column is not None:
            for key, recipe in self.views.items():
                if recipe.image is None:
                    continue
                view = build_image_view(recipe.image, view_config)
                if self.landmarks and view.moves_geometry:
                    raise ViewError(
                        f"view {key!r} (recipe {recipe.name!r}, image view {recipe.image!r}) flips/crops "
                        "images, which would detach landmark targets from the pixels; landmark methods use "
                        "the 'translate' and 'eval' recipes"
                    )
                self.image_views[key] = view
                if view_config.views_on_device and device_view_unsupported(recipe.image, view_config) is None:
                    self.device_views[key] = recipe.image
        self._resize_only = build_image_view("eval", view_config) if self.device_views else None
        self._images = None
        if self.image_views:
            import datasets

            if self.image_column not in split.column_names:
                raise LoaderError(
                    f"the dataset has no image column {self.image_column!r} (metadata.image_column); "
                    f"columns: {split.column_names}"
                )
            images = split.select_columns([self.image_column])
            feature = images.features[self.image_column]
            if isinstance(feature, datasets.Image) and feature.decode:
                images = images.cast_column(self.image_column, datasets.Image(decode=False))
            self._images = images
        # Landmarks: coordinates are rescaled to the model input frame, which needs decode sizes.
        self._decode_size = (view_config.image_size
                             if (view_config.decode_to_image_size or self.landmarks) else None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = (int(key), 0)
        return self.__getitems__([key])

    def _labels(self, rows: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        labels = self.labels[rows]
        if self.landmarks and scale is not None:
            labels = labels * np.tile(scale, (1, labels.shape[1] // 2))
        return torch.from_numpy(np.ascontiguousarray(labels))

    def __getitems__(self, keys) -> dict[str, Any]:
        with single_threaded():
            return self._batch(keys)

    def _batch(self, keys) -> dict[str, Any]:
        keys = [(int(k), 0) if isinstance(k, (int, np.integer)) else (int(k[0]), int(k[1])) for k in keys]
        positions = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        passes = np.fromiter((k[1] for k in keys), dtype=np.int64, count=len(keys))
        rows = self.rows[positions]
        ids = rows if self.row_ids is None else self.row_ids[rows]
        images, scale = None, None
        if self._images is not None:
            values = self._images[rows.tolist()][self.image_column]
            decoded = [decode_image(v, self.config.num_channels, self._decode_size) for v in values]
            images = [d[0] for d in decoded]
            stored = np.asarray([d[1] for d in decoded], dtype=np.float32)  # (B, 2) = (w, h)
            scale = self.config.image_size / stored
        label_key = "monitor_labels" if self.kind == "unlabeled" else "labels"
        labels = self._labels(rows, scale)
        batch: dict[str, Any] = {label_key: labels, "index": torch.from_numpy(ids.copy())}
        if self.kind != "eval":
            batch["position"] = torch.from_numpy(positions if self.stream_positions is None else self.stream_positions[rows])
        clean = None
        if self.tabular is not None:
            clean = {k: v[rows] for k, v in self.tabular.items()}
        for key, recipe in self.views.items():
            seeds = sample_seeds(self.config.seed, self.stream, key, passes, ids)
            coins = joint_coins(seeds, joint_probability(recipe, self.config))
            inputs: dict[str, torch.Tensor] = {}
            view = self.image_views.get(key)
            if view is not None:
                shape = (len(images), self.config.num_channels, self.config.image_size, self.config.image_size)
                if key in self.device_views:
                    # resized only: the view is made on the device from these seeds (and joint coins)
                    pixels, translation = apply_image_view(self._resize_only, images, seeds,
                                                           out=_output_buffer(shape, torch.uint8))
                    inputs["pixel_values"] = pixels
                    inputs[DEVICE_VIEW_KEY] = device_view_request(self.device_views[key], seeds, coins)
                elif self.config.normalize_in_loader:
                    pixels, translation = apply_image_view(view, images, seeds, coins)
                    inputs["pixel_values"] = normalize_batch(pixels, self.config, out=_output_buffer(shape, torch.float32))
                else:
                    pixels, translation = apply_image_view(view, images, seeds, coins,
                                                           out=_output_buffer(shape, torch.uint8))
                    inputs["pixel_values"] = pixels
                if translation is not None:
                    inputs["translation"] = translation
                    if self.landmarks:
                        # ground truth of unlabelled rows stays under monitor_* keys (never in a loss)
                        moved = labels + translation.repeat(1, labels.shape[1] // 2)
                        inputs["monitor_labels" if self.kind == "unlabeled" else "labels"] = moved
            if clean is not None:
                tab = recipe.tabular(clean, seeds, self.pool, coins)
                inputs.update({k: torch.from_numpy(v) for k, v in tab.items()})
            batch[key] = inputs
        return batch


def _output_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """In a DataLoader worker, an empty tensor in shared memory: results written there reach the main
    process without the extra copy pickling would make (what torch's default_collate does). Else None."""
    if torch.utils.data.get_worker_info() is None:
        return None
    numel = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    except (AttributeError, RuntimeError):  # private API moved: fall back on a plain tensor
        return torch.empty(shape, dtype=dtype)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _passthrough(batch):
    return batch


# ================================================================================= building
def _labeled_mask(train, metadata: DatasetMetadata) -> np.ndarray:
    n = len(train)
    if metadata.labeled_column and metadata.labeled_column in train.column_names:
        values = _column(train, metadata.labeled_column)
        return np.asarray([bool(v) for v in values], dtype=bool)
    if metadata.labeled_indices is not None:
        mask = np.zeros(n, dtype=bool)
        indices = np.asarray(metadata.labeled_indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise LoaderError(f"metadata.labeled_indices has rows outside the train split of {n} rows")
        mask[indices] = True
        return mask
    return np.ones(n, dtype=bool)


def _check_split(dataset_dict, name: str):
    if name not in dataset_dict:
        raise LoaderError(f"the dataset has no {name!r} split; splits: {list(dataset_dict.keys())}")
    return dataset_dict[name]


class _DataSource:
    """Per-dataset state shared by every loader: labels, pre-encoded tables, corruption pool."""

    def __init__(self, dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None,
                 view_config: ViewConfig):
        self.dataset_dict = dataset_dict
        self.metadata = metadata
        self.schema = schema
        self.config = view_config
        if metadata.task == "landmarks" and view_config.num_channels not in (1, 3):
            raise LoaderError("landmark images need 1 or 3 channels")
        self._labels: dict[str, np.ndarray] = {}
        self._tabular: dict[str, dict[str, np.ndarray] | None] = {}

    def split(self, name: str):
        return _check_split(self.dataset_dict, name)

    def labels(self, name: str) -> np.ndarray:
        if name not in self._labels:
            split = self.split(name)
            column = self.metadata.label_column
            if column not in split.column_names:
                values = [None] * len(split)  # unlabelled-only split: monitor labels are -1 / NaN
            else:
                values = _column(split, column)
            self._labels[name] = _label_array(values, self.metadata.task, self.metadata.num_targets)
        return self._labels[name]

    def tabular(self, name: str) -> dict[str, np.ndarray] | None:
        if self.schema is None:
            return None
        if name not in self._tabular:
            self._tabular[name] = encode_split_tabular(self.split(name), self.schema, where=f"split {name!r}")
        return self._tabular[name]

    def dataset(self, name: str, views, rows, *, kind: str, stream: str, pool: TabularPool | None) -> ViewDataset:
        return ViewDataset(self.split(name), self.metadata, views, self.config, rows, kind=kind, stream=stream,
                           labels=self.labels(name), tabular=self.tabular(name), pool=pool)


AUTO_MAX_WORKERS = 16


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which a scheduler or ``taskset`` narrows),
    not the machine's count."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_num_workers(cpus: int, local_processes: int = 1, device_type: str = "cuda") -> int:
    """``--dataloader_num_workers auto``: loader worker processes for one training process.

    On an accelerator the step runs elsewhere and the CPU only makes views, which a fast GPU step
    outruns (docs/benchmarks.md: one core makes a few hundred STiL rows/s, a GPU step consumes
    thousands): each training process takes its share of the machine's cores, keeps one for itself
    (the loop, collation, host-to-device copies) and gives the rest to workers, at most
    ``AUTO_MAX_WORKERS`` (each worker holds ``prefetch_factor`` batches, ~0.2 GB for STiL's 448-row
    unlabelled batch at 128 px, plus its own process). On the CPU the step itself needs every core
    and loading is a few per cent of it, so workers would only take cores from the step: 0, as on a
    machine with one core per process."""
    if device_type == "cpu":
        return 0
    share = max(1, cpus) // max(1, local_processes)
    return max(0, min(AUTO_MAX_WORKERS, share - 1))


def resolve_num_workers(value: int | str, local_processes: int = 1, device_type: str = "cuda") -> int:
    """An explicit count as given; ``"auto"`` by `auto_num_workers` on this process's cores."""
    if value == "auto":
        return auto_num_workers(available_cpus(), local_processes, device_type)
    if int(value) < 0:
        raise LoaderError(f"dataloader_num_workers is {value}: give 0 or more, or 'auto'")
    return int(value)


def _loader(dataset: ViewDataset, sampler: ShardedBatchSampler, num_workers: int, pin_memory: bool,
            persistent_workers: bool, prefetch_factor: int | None) -> DataLoader:
    extra = {}
    if num_workers > 0:
        extra = dict(persistent_workers=persistent_workers, prefetch_factor=prefetch_factor or 2)
    # Our own generator: DataLoader draws a worker base seed from it on every iter(), which would
    # otherwise advance the global RNG (dropout, init) differently after a resume. Augmentation does
    # not use worker seeds (views are seeded per sample).
    generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_passthrough,
                      pin_memory=pin_memory, generator=generator, **extra)


class SemiSupervisedLoaders:
    """The labelled (and unlabelled) training streams of one process, plus eval loaders."""

    def __init__(self, dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None, *,
                 labeled_views: Mapping[str, str | ViewRecipe],
                 unlabeled_views: Mapping[str, str | ViewRecipe] | None = None,
                 view_config: ViewConfig | None = None, batch_size: int = 64, mu: int = 7,
                 seed: int | None = None, num_workers: int = 0, labeled_num_workers: int | None = None,
                 pin_memory: bool = False, persistent_workers: bool = True, prefetch_factor: int | None = 2,
                 num_replicas: int = 1, rank: int = 0, unlabeled_includes_labeled: bool = False,
                 corruption_pool: str = "split", train_split: str = "train", label_free: bool = False,
                 meta_views: Mapping[str, str | ViewRecipe] | None = None, meta_batch_size: int | None = None,
                 epoch: str = "unlabeled"):
        view_config = view_config or ViewConfig()
        if seed is not None and seed != view_config.seed:
            from dataclasses import replace

            view_config = replace(view_config, seed=int(seed))
        if corruption_pool not in ("split", "stream"):
            raise LoaderError(f"corruption_pool must be 'split' or 'stream', got {corruption_pool!r}")
        if batch_size < 1 or mu < 0:
            raise LoaderError(f"batch_size must be >= 1 and mu >= 0, got {batch_size} and {mu}")
        self.source = _DataSource(dataset_dict, metadata, schema, view_config)
        self.config = view_config
        self.metadata = metadata
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        if epoch not in ("unlabeled", "longest"):
            raise LoaderError(f"epoch must be 'unlabeled' or 'longest', got {epoch!r}")
        self.epoch_definition = epoch
        train = self.source.split(train_split)
        if len(train) == 0:
            raise LoaderError(f"the {train_split!r} split is empty")
        if label_free:
            # Pretraining: no label is read; one stream over every train row.
            if not unlabeled_views:
                raise LoaderError("label_free needs unlabeled_views (the views of the single stream)")
            labeled_views, meta_views, unlabeled_includes_labeled = None, None, True
            mask = np.zeros(len(train), dtype=bool)
        else:
            labels = self.source.labels(train_split)
            mask = _labeled_mask(train, metadata)
        self.label_free = label_free
        if not label_free:
            self._check_labels(labels, mask, metadata)
        self.labeled_rows = np.flatnonzero(mask)
        self.unlabeled_rows = np.arange(len(train)) if unlabeled_includes_labeled else np.flatnonzero(~mask)
        self.num_labeled, self.num_unlabeled = len(self.labeled_rows), len(self.unlabeled_rows)
        self.labeled_batch_size = int(batch_size)
        self.unlabeled_batch_size = int(mu * batch_size) if not label_free else int(batch_size)
        self.meta_batch_size = int(meta_batch_size or batch_size) if meta_views else 0
        self._build(train_split, labeled_views, unlabeled_views, meta_views, corruption_pool, labeled_num_workers,
                    num_workers, mu, num_replicas, rank, batch_size)

    @staticmethod
    def _check_labels(labels, mask, metadata) -> None:
        if metadata.task == "classification":
            check_labeled_split(labels, mask, num_classes=len(metadata.label_names or []) or None)
        elif not mask.any():
            check_labeled_split(np.zeros(len(mask), dtype=np.int64), mask)
        labeled_rows = np.flatnonzero(mask)
        label_missing = labels[labeled_rows] < 0 if labels.dtype.kind == "i" else np.isnan(
            labels[labeled_rows].reshape(len(labeled_rows), -1)).any(axis=1)
        if label_missing.any():
            raise SplitError(
                f"{int(label_missing.sum())} labelled train rows (e.g. row {int(labeled_rows[label_missing][0])}) "
                f"have no label in column {metadata.label_column!r}; fix the data or the labeled column"
            )

    def _build(self, train_split, labeled_views, unlabeled_views, meta_views, corruption_pool, labeled_num_workers,
               num_workers, mu, num_replicas, rank, batch_size) -> None:
        tab = self.source.tabular(train_split)
        split_pool = TabularPool.from_arrays(tab) if tab is not None else None

        def stream(name, views, rows, batch, kind, workers, too_big):
            """(sampler, dataset, loader) of one stream; ``too_big`` explains an empty pass."""
            sampler = ShardedBatchSampler(len(rows), batch, seed=self.config.seed, stream=name,
                                          num_replicas=num_replicas, rank=rank)
            if sampler.batches_per_pass == 0:
                raise LoaderError(too_big)
            pool = None
            if tab is not None:
                pool = split_pool if corruption_pool == "split" else TabularPool.from_arrays(tab, rows)
            dataset = self.source.dataset(train_split, views, rows, kind=kind, stream=name, pool=pool)
            loader = _loader(dataset, sampler, workers, self.pin_memory, self.persistent_workers, self.prefetch_factor)
            return sampler, dataset, loader

        self.labeled_sampler = self.labeled_dataset = self.labeled_loader = None
        self.meta_sampler = self.meta_loader = None
        self.unlabeled_sampler = self.unlabeled_dataset = self.unlabeled_loader = None
        if labeled_views:
            # Workers in proportion to the rows each stream loads per step (1 : mu), at least one.
            lw = labeled_num_workers
            if lw is None:
                lw = num_workers if num_workers == 0 or not unlabeled_views else max(1, math.ceil(num_workers / (1 + mu)))
            self.labeled_sampler, self.labeled_dataset, self.labeled_loader = stream(
                "labeled", labeled_views, self.labeled_rows, self.labeled_batch_size, "labeled", lw,
                f"labelled batch size {batch_size} x {num_replicas} process(es) exceeds the {self.num_labeled} "
                "labelled rows, so drop_last leaves no batch; lower the batch size or label more rows")
            if meta_views:
                # an independently shuffled labelled stream (its own permutation seed: stream "meta")
                self.meta_sampler, _, self.meta_loader = stream(
                    "meta", meta_views, self.labeled_rows, self.meta_batch_size, "labeled", lw,
                    f"meta batch size {self.meta_batch_size} x {num_replicas} process(es) exceeds the "
                    f"{self.num_labeled} labelled rows; lower the batch size or label more rows")
        if unlabeled_views:
            if self.unlabeled_batch_size < 1:
                raise LoaderError("mu must be >= 1 when the method has unlabelled views")
            if self.num_unlabeled == 0:
                raise LoaderError(
                    "the method needs unlabelled data but every train row is labelled; use a labelled "
                    "fraction < 1 or unlabeled_includes_labeled=True"
                )
            self.unlabeled_sampler, self.unlabeled_dataset, self.unlabeled_loader = stream(
                "unlabeled", unlabeled_views, self.unlabeled_rows, self.unlabeled_batch_size, "unlabeled", num_workers,
                f"unlabelled batch size {self.unlabeled_batch_size} (mu={mu} x {batch_size}) x {num_replicas} "
                f"process(es) exceeds the {self.num_unlabeled} unlabelled rows; lower mu or the batch size")

    # ------------------------------------------------------------------ iteration
    @property
    def steps_per_epoch(self) -> int:
        """Optimisation steps per epoch: one pass over the unlabelled pool (else the labelled rows)."""
        passes = [s.batches_per_pass for s in (self.unlabeled_sampler, self.labeled_sampler) if s is not None]
        if self.epoch_definition == "longest":
            return max(passes)
        return passes[0]

    @property
    def labeled_batches_per_pass(self) -> int:
        return self.labeled_sampler.batches_per_pass if self.labeled_sampler is not None else 0

    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def iterate(self, start_step: int = 0) -> Iterator[tuple[dict, dict | None]]:
        """``(labeled, unlabeled)`` for steps start_step, start_step + 1, ... forever.

        Batch ``s`` is the same as in an uninterrupted run from step 0; skipped batches are never
        loaded. Starting a new ``iterate`` invalidates the previous generator of this object.
        """
        if start_step < 0:
            raise LoaderError(f"start_step must be >= 0, got {start_step}")
        def start(sampler, loader):
            if loader is None:
                return None
            sampler.start_step = int(start_step)
            return iter(loader)

        labeled_iter = start(self.labeled_sampler, self.labeled_loader)
        meta_iter = start(self.meta_sampler, self.meta_loader)
        unlabeled_iter = start(self.unlabeled_sampler, self.unlabeled_loader)
        while True:
            labeled = next(labeled_iter) if labeled_iter is not None else None
            if meta_iter is not None:
                labeled["meta"] = next(meta_iter)
            unlabeled = next(unlabeled_iter) if unlabeled_iter is not None else None
            yield labeled, unlabeled

    # ------------------------------------------------------------------ evaluation
    def build_eval_loader(self, split: str, batch_size: int, views: Mapping[str, str] | None = None,
                          num_workers: int | None = None, num_replicas: int = 1, rank: int = 0) -> DataLoader:
        return _eval_loader(self.source, split, batch_size, views, self.num_workers if num_workers is None else num_workers,
                            self.pin_memory, num_replicas, rank)


def _eval_loader(source: _DataSource, split: str, batch_size: int, views, num_workers: int, pin_memory: bool,
                 num_replicas: int, rank: int) -> DataLoader:
    data = source.split(split)
    if len(data) == 0:
        raise LoaderError(f"the {split!r} split is empty")
    rows = np.arange(len(data))
    dataset = source.dataset(split, views or {"eval": "eval"}, rows, kind="eval", stream=f"eval:{split}", pool=None)
    sampler = ShardedBatchSampler(len(rows), batch_size, seed=0, stream=split, shuffle=False, drop_last=False,
                                  num_replicas=num_replicas, rank=rank, infinite=False)
    return _loader(dataset, sampler, num_workers, pin_memory, persistent_workers=False, prefetch_factor=2)


def build_train_loaders(dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None, *,
                        labeled_views, unlabeled_views=None, view_config: ViewConfig | None = None,
                        batch_size: int = 64, mu: int = 7, **options) -> SemiSupervisedLoaders:
    """See `SemiSupervisedLoaders` (options: seed, num_workers, labeled_num_workers, pin_memory,
    persistent_workers, prefetch_factor, num_replicas, rank, unlabeled_includes_labeled,
    corruption_pool ('split' | 'stream'), train_split)."""
    return SemiSupervisedLoaders(dataset_dict, metadata, schema, labeled_views=labeled_views,
                                 unlabeled_views=unlabeled_views, view_config=view_config, batch_size=batch_size,
                                 mu=mu, **options)


def build_eval_loader(dataset_dict, metadata: DatasetMetadata, schema: TabularSchema | None, split: str,
                      batch_size: int, view_config: ViewConfig | None = None, *, views=None, num_workers: int = 0,
                      pin_memory: bool = False, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """Sequential, deterministic loader over a whole split: batches {"labels", "index", "eval": inputs}."""
    source = _DataSource(dataset_dict, metadata, schema, view_config or ViewConfig())
    return _eval_loader(source, split, batch_size, views, num_workers, pin_memory, num_replicas, rank)
