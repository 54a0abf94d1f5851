"""AFLW (IMM release layout) -> image-only stil landmarks dataset (5 facial landmarks, 10 targets).

Input folder (e.g. ``aflw_release-2/``)::

    aflw_{train,test}_images.txt      one relative image name per line, under output/
    aflw_{train,test}_keypoints.mat   ``gt``: N x 5 x 2, stored (y, x)
    output/<names>                    the images

Labels are ``(x1, y1, ..., x5, y5)`` in pixels of the stored (original) image, in the .mat's
landmark order after swapping (y, x) -> (x, y). The last ``round(0.1 * N)`` training entries are the
validation set (as in L2I). Images are embedded as stored (mode L or RGB; others converted to RGB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io import DatasetMetadata
from ._common import BuildError, check_output_free, make_features, read_image_file, write_dataset


def read_aflw_split(root: Path, split: str):
    """-> (image paths, N x 10 float32 landmarks (x, y) ...) for ``split`` in (train, test)."""
    import scipy.io

    names_file = root / f"aflw_{split}_images.txt"
    mat_file = root / f"aflw_{split}_keypoints.mat"
    for f in (names_file, mat_file):
        if not f.is_file():
            raise BuildError(f"missing file {f}; --aflw-root must be the IMM release folder (aflw_release-2)")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    try:
        mat = scipy.io.loadmat(mat_file)
    except Exception as error:  # noqa: BLE001
        raise BuildError(f"{mat_file} is not a readable .mat file ({error})") from None
    if "gt" not in mat:
        raise BuildError(f"{mat_file} has no 'gt' array (keys: {sorted(k for k in mat if not k.startswith('__'))})")
    gt = np.asarray(mat["gt"], dtype=np.float64)
    if gt.ndim != 3 or gt.shape[1:] != (5, 2):
        raise BuildError(f"{mat_file}: gt has shape {gt.shape}; expected N x 5 x 2 (y, x)")
    if gt.shape[0] != len(names):
        raise BuildError(f"the table and images do not match: {names_file.name} lists {len(names)} images but "
                         f"{mat_file.name} has {gt.shape[0]} keypoint rows")
    bad = np.flatnonzero(~np.isfinite(gt).all(axis=(1, 2)))
    if bad.size:
        raise BuildError(f"{mat_file} row {int(bad[0])} ({names[int(bad[0])]}): non-finite landmark; fix or drop it")
    dup = {n for n in names if names.count(n) > 1} if len(set(names)) != len(names) else set()
    if dup:
        raise BuildError(f"{names_file}: duplicated image name {sorted(dup)[0]!r}; one row per image")
    landmarks = gt[:, :, ::-1].reshape(len(names), 10).astype(np.float32)
    paths = [root / "output" / n for n in names]
    for i, p in enumerate(paths):
        if not p.is_file():
            raise BuildError(f"{names_file} row {i}: image file {p} does not exist; unpack the images under output/")
    return paths, landmarks


def build_aflw(
    aflw_root: str | os.PathLike,
    output: str | os.PathLike,
    *,
    labeled_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    import datasets
    import torch

    check_output_free(output, overwrite)
    root = Path(aflw_root)
    train_paths, train_y = read_aflw_split(root, "train")
    test_paths, test_y = read_aflw_split(root, "test")
    n_val = int(round(0.1 * len(train_paths)))
    cut = len(train_paths) - n_val
    if cut <= 0:
        raise BuildError(f"{root}: too few training images ({len(train_paths)}) to hold out a validation set")
    n_train = cut
    if labeled_fraction is None:
        labeled = np.ones(n_train, dtype=bool)
    else:
        if not 0.0 < labeled_fraction <= 1.0:
            raise BuildError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
        count = int(round(n_train * labeled_fraction))
        if count == 0:
            raise BuildError(f"--labeled-fraction {labeled_fraction} of {n_train} training images labels none; "
                             "the labelled set is empty: raise the fraction")
        generator = torch.Generator().manual_seed(seed)
        labeled = np.zeros(n_train, dtype=bool)
        labeled[torch.randperm(n_train, generator=generator)[:count].numpy()] = True
    features = make_features(None, datasets.List(datasets.Value("float32")))
    splits = {
        "train": {"image": train_paths[:cut], "label": train_y[:cut].tolist(), "labeled": labeled.tolist()},
        "validation": {"image": train_paths[cut:], "label": train_y[cut:].tolist(), "labeled": [False] * n_val},
        "test": {"image": test_paths, "label": test_y.tolist(), "labeled": [False] * len(test_paths)},
    }
    metadata = DatasetMetadata(
        task="landmarks", label_names=None, num_targets=10, labeled_indices=np.flatnonzero(labeled).tolist(),
        split_info={"protocol": "l2i-aflw", "seed": seed, "fraction": labeled_fraction,
                    "validation": f"last round(0.1*N) = {n_val} training entries"},
        source={"builder": "aflw", "aflw_root": str(root),
                "targets": "x1,y1,...,x5,y5 in pixels of the stored image; .mat order, (y,x) swapped to (x,y)"},
    )
    return write_dataset(splits, features, output, metadata, schema=None, overwrite=overwrite,
                         image_loader=lambda p, w: read_image_file(p, w, mode=None), progress=progress)
