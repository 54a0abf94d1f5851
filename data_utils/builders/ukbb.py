"""UK Biobank cardiac data in TIP's preprocessed layout -> stil dataset (CAD or Infarction, binary).

Input folder (TIP's ``final`` folder)::

    cardiac_features_{train,val,test}_imputed_noOH_tabular_imaging_reordered.csv   no header, cat first
    cardiac_{train,val,test}_paths_imaging.pt     list of .npy paths: float32 210x210x3 in [0, 1]
    cardiac_labels_{CAD|Infarction}_{train,val,test}.pt   0/1 per row (list or numpy array)
    tabular_lengths_reordered.pt                  field lengths (categorical > 1, continuous 1)

Tabular values are stored as given (TIP already z-scored and imputed them); images become RGB PNG
(uint8 = round(x * 255)), a lossless 8-bit quantisation of the [0, 1] floats. ``balanced=True``
reproduces TIP's balanced training set (all positives, then ``random.seed(seed)`` +
``random.sample`` of as many negatives); validation/test stay imbalanced.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from ..io import DatasetMetadata
from ..schema import TabularSchema
from ._common import (
    BuildError,
    check_output_free,
    check_tip_columns,
    load_pt,
    make_features,
    read_npy_image,
    write_dataset,
)

TARGETS = ("CAD", "Infarction")
SPLITS = {"train": "train", "validation": "val", "test": "test"}
LENGTHS_FILE = "tabular_lengths_reordered.pt"


def ukbb_files(split: str, target: str) -> dict[str, str]:
    return {
        "features": f"cardiac_features_{split}_imputed_noOH_tabular_imaging_reordered.csv",
        "paths": f"cardiac_{split}_paths_imaging.pt",
        "labels": f"cardiac_labels_{target}_{split}.pt",
    }


def balanced_indices(labels, seed: int = 2022) -> np.ndarray:
    """TIP's balanced set: positives in order, then ``random.sample`` of as many negatives (seeded)."""
    labels = np.asarray(labels)
    positives = np.flatnonzero(labels == 1).tolist()
    negatives = np.flatnonzero(labels == 0).tolist()
    if len(negatives) < len(positives):
        raise BuildError(f"cannot balance: {len(positives)} positives but only {len(negatives)} negatives")
    rng = random.Random(seed)
    return np.asarray(positives + rng.sample(negatives, len(positives)), dtype=np.int64)


def low_data_indices(labels, subset: str, seed: int = 2022) -> np.ndarray:
    """TIP's cardiac low-data rows: stratified 10 % (``train_test_split``, seed), applied once for
    "0.1" and again on that subset for "0.01". Positions into ``labels``."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    current = np.arange(labels.size)
    for _ in range({"0.1": 1, "0.01": 2}[subset]):
        try:
            _, chosen = train_test_split(list(range(current.size)), test_size=0.1, random_state=seed,
                                         stratify=labels[current])
        except ValueError as error:
            raise BuildError(f"low-data subset {subset} of {current.size} rows: {error}") from None
        current = current[np.asarray(chosen)]
    return current


def build_ukbb(
    features_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    target: str = "CAD",
    balanced: bool = False,
    labeled_subset: str | None = None,
    seed: int = 2022,
    column_names: list[str] | None = None,
    images_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    import datasets
    import pandas as pd

    check_output_free(output, overwrite)
    if target not in TARGETS:
        raise BuildError(f"--target must be one of {TARGETS}, got {target!r}")
    if labeled_subset is not None and labeled_subset not in ("0.1", "0.01"):
        raise BuildError(f"--labeled-subset must be 0.1 or 0.01, got {labeled_subset!r}")
    features_dir = Path(features_dir)
    lengths = [int(x) for x in load_pt(features_dir / LENGTHS_FILE)]
    n_cat = sum(1 for x in lengths if x > 1)
    if any(x == 1 for x in lengths[:n_cat]) or any(x > 1 for x in lengths[n_cat:]) or any(x < 1 for x in lengths):
        raise BuildError(f"{features_dir / LENGTHS_FILE}: lengths {lengths} are not reordered (categorical fields, "
                         "length > 1, must come first)")
    if column_names is None:
        column_names = [f"cat_{i:02d}" for i in range(n_cat)] + [f"con_{j:02d}" for j in range(len(lengths) - n_cat)]
    if len(column_names) != len(lengths) or len(set(column_names)) != len(column_names):
        raise BuildError(f"--column-names gives {len(column_names)} names (must be {len(lengths)}, all distinct)")
    cat_names, con_names = column_names[:n_cat], column_names[n_cat:]

    tables, labels, sources = {}, {}, {}
    for split, tip in SPLITS.items():
        names = ukbb_files(tip, target)
        csv = features_dir / names["features"]
        if not csv.is_file():
            raise BuildError(f"missing file {csv}; point --features-dir at TIP's preprocessed cardiac folder")
        df = pd.read_csv(csv, header=None)
        if df.shape[1] != len(lengths):
            raise BuildError(f"{csv} has {df.shape[1]} columns but {LENGTHS_FILE} lists {len(lengths)} fields")
        lab = [int(x) for x in load_pt(features_dir / names["labels"])]
        paths = [str(p) for p in load_pt(features_dir / names["paths"])]
        if not (len(df) == len(lab) == len(paths)):
            raise BuildError(f"{split}: the table and images do not match: {names['features']} has {len(df)} rows, "
                             f"{names['labels']} {len(lab)} labels, {names['paths']} {len(paths)} paths")
        bad = [i for i, v in enumerate(lab) if v not in (0, 1)]
        if bad:
            raise BuildError(f"{features_dir / names['labels']} row {bad[0]}: label {lab[bad[0]]} is not 0/1")
        if len(set(paths)) != len(paths):
            dup = next(p for p in paths if paths.count(p) > 1)
            raise BuildError(f"{features_dir / names['paths']}: duplicated image path {dup}; one image per subject")
        resolved = []
        for i, p in enumerate(paths):
            q = Path(p)
            if images_root is not None:
                q = Path(images_root) / Path(*q.parts[-2:])  # <subject id>/<file>.npy
            elif not q.is_absolute():
                q = features_dir / q
            if not q.is_file():
                raise BuildError(f"{features_dir / names['paths']} row {i}: image file {q} does not exist; fix "
                                 "--images-root or the paths file")
            resolved.append(q)
        tables[split] = check_tip_columns(df, column_names, lengths, str(csv), LENGTHS_FILE)
        labels[split], sources[split] = lab, resolved

    keep = np.arange(len(labels["train"]))
    if balanced:
        keep = balanced_indices(labels["train"], seed)
    train_labels = np.asarray(labels["train"])[keep]
    if set(train_labels.tolist()) != {0, 1}:
        raise BuildError(f"the train split needs both classes of {target}; found {sorted(set(train_labels.tolist()))}")
    mask = np.ones(keep.size, dtype=bool)
    if labeled_subset is not None:
        mask = np.zeros(keep.size, dtype=bool)
        mask[low_data_indices(train_labels, labeled_subset, seed)] = True
    if set(train_labels[mask].tolist()) != {0, 1}:
        raise BuildError(f"the labelled set lacks a class of {target}; use a larger subset")
    tables["train"] = {c: [v[i] for i in keep] for c, v in tables["train"].items()}
    labels["train"] = train_labels.tolist()
    sources["train"] = [sources["train"][i] for i in keep]

    schema = TabularSchema.fit(
        {c: tables["train"][c] for c in con_names}, categorical=cat_names, continuous=con_names,
        categories={c: [str(k) for k in range(lengths[j])] for j, c in enumerate(cat_names)},
    )
    names = [f"no_{target}", target]
    features = make_features(schema, datasets.ClassLabel(names=names))
    splits = {
        s: {"image": sources[s], "label": labels[s], **tables[s],
            "labeled": mask.tolist() if s == "train" else [False] * len(labels[s])}
        for s in SPLITS
    }
    metadata = DatasetMetadata(
        task="classification", label_names=names, labeled_indices=np.flatnonzero(mask).tolist(),
        split_info={"protocol": "ukbb-tip-low-data" if labeled_subset else "all-labeled", "subset": labeled_subset,
                    "seed": seed, "balanced_train": balanced},
        source={"builder": "ukbb", "features_dir": str(features_dir), "target": target,
                "values": "as given by TIP (z-scored and imputed); categorical vocabularies are TIP's codes",
                "images": "float32 [0,1] .npy -> uint8 round(x*255) RGB PNG (channels ES, mid-systole, ED)"},
    )
    return write_dataset(splits, features, output, metadata, schema=schema, overwrite=overwrite,
                         image_loader=lambda p, w: read_npy_image(p, w, scale=255.0), progress=progress)
