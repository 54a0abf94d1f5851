"""CIFAR-10 (python pickle tarball) -> image-only stil dataset with the L2I/MixMatch split.

Input: ``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` and
``batches.meta``. Per class c (0..9, in order) the class's training indices are shuffled with one
``numpy.random.RandomState(seed)``; the first ``num_labeled / 10`` are labelled, the last
``val_per_class`` (500) are the validation set, the rest unlabelled. Test = the official 10,000.
The batches are unpickled with an allow-list (numpy arrays only), never with a bare ``pickle.load``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..io import DatasetMetadata
from ._common import BuildError, check_output_free, make_features, png_bytes, write_dataset

MEMBER_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_member(tar: tarfile.TarFile, name: str, path: Path) -> dict:
    member = f"{MEMBER_DIR}/{name}"
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise BuildError(f"{path} lacks {member}; use the official cifar-10-python.tar.gz")
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"{path}: {member} is not a CIFAR pickle batch ({error})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar10(tarball: str | os.PathLike):
    """-> (train_images N,32,32,3 uint8, train_labels, test_images, test_labels, label_names)."""
    path = Path(tarball)
    if not path.is_file():
        raise BuildError(f"{path} does not exist; download cifar-10-python.tar.gz (python version)")
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as error:
        raise BuildError(f"{path} is not a readable tar archive ({error})") from None
    with tar:
        meta = _load_member(tar, "batches.meta", path)
        parts = [_load_member(tar, name, path) for name in TRAIN_BATCHES]
        test = _load_member(tar, "test_batch", path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]

    def arrays(batches, what):
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise BuildError(f"{path}: {what} batches hold data {data.shape} and {len(labels)} labels; expected N x 3072")
        if labels.min() < 0 or labels.max() >= len(names):
            raise BuildError(f"{path}: {what} labels outside 0..{len(names) - 1}")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train_x, train_y = arrays(parts, "training")
    test_x, test_y = arrays([test], "test")
    return train_x, train_y, test_x, test_y, names


def l2i_split(labels, num_labeled: int, seed: int, val_per_class: int = 500, num_classes: int = 10):
    """(labelled, unlabelled, validation) index arrays, each sorted, with L2I's per-class rule."""
    if num_labeled % num_classes or num_labeled <= 0:
        raise BuildError(f"--num-labeled must be a positive multiple of {num_classes}, got {num_labeled}")
    per_class = num_labeled // num_classes
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    labeled, unlabeled, val = [], [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class + val_per_class:
            raise BuildError(f"class {c} has {idx.size} training images, fewer than {per_class} labelled + "
                             f"{val_per_class} validation; lower --num-labeled or --val-per-class")
        rng.shuffle(idx)
        labeled.extend(idx[:per_class])
        unlabeled.extend(idx[per_class: idx.size - val_per_class])
        val.extend(idx[idx.size - val_per_class:])
    return np.sort(labeled), np.sort(unlabeled), np.sort(val)


def build_cifar10(
    tarball: str | os.PathLike,
    output: str | os.PathLike,
    *,
    num_labeled: int = 250,
    seed: int = 0,
    val_per_class: int = 500,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    import datasets

    check_output_free(output, overwrite)
    train_x, train_y, test_x, test_y, names = read_cifar10(tarball)
    labeled, unlabeled, val = l2i_split(train_y, num_labeled, seed, val_per_class, num_classes=len(names))
    train = np.sort(np.concatenate([labeled, unlabeled]))
    labeled_set = set(labeled.tolist())
    features = make_features(None, datasets.ClassLabel(names=names))
    splits = {
        "train": {"image": [train_x[i] for i in train], "label": train_y[train].tolist(),
                  "labeled": [int(i) in labeled_set for i in train]},
        "validation": {"image": [train_x[i] for i in val], "label": train_y[val].tolist(),
                       "labeled": [False] * len(val)},
        "test": {"image": list(test_x), "label": test_y.tolist(), "labeled": [False] * len(test_y)},
    }
    labeled_rows = [k for k, i in enumerate(train) if int(i) in labeled_set]
    metadata = DatasetMetadata(
        task="classification", label_names=names, labeled_indices=labeled_rows,
        split_info={"protocol": "l2i-cifar10", "seed": seed, "num_labeled": num_labeled,
                    "per_class": num_labeled // len(names), "val_per_class": val_per_class,
                    "original_train_indices": {"train": train.tolist(), "validation": val.tolist()}},
        source={"builder": "cifar10", "tarball": str(tarball)},
    )
    return write_dataset(splits, features, output, metadata, schema=None, overwrite=overwrite,
                         image_loader=lambda a, w: {"bytes": png_bytes(a), "path": None}, progress=progress)
