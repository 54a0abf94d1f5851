"""Which training rows keep their label in a run, and what the loaders and the model learn from them.

A dataset carries its own labelled split (the ``labeled`` column of ``train``, or ``labeled_indices`` in
its metadata). A run may redraw it (`LabelRedraw`: ``--labeled_fraction`` / ``--labeled_per_class`` with
a dataset); the embedded synthetic dataset is instead *built* with its fraction
(`data_utils.preparation.SyntheticBuild`), so its own split is the one used."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .splits import SplitError, check_labeled_split, redraw_labeled


@dataclass(frozen=True)
class LabelRedraw:
    """A redraw of a dataset's labelled rows: ``fraction`` of the training rows or ``per_class`` rows of
    each class (stratified by class on classification data), seeded."""

    fraction: float | None = None
    per_class: int | None = None
    seed: int = 0

    def describe(self) -> str:
        asked = {k: v for k, v in (("labeled_fraction", self.fraction), ("labeled_per_class", self.per_class)) if v is not None}
        return "re-drawn: " + ", ".join(f"{k} {v:g}" for k, v in asked.items()) + f", seed {self.seed}"


def labeled_rows(dataset_dict, metadata, redraw: LabelRedraw | None = None) -> list[int]:
    """Training rows that keep their label: ``redraw``'s draw, else the dataset's own split (all rows
    of a fully labelled dataset). Refuses a split with no labelled row or a class without one."""
    train = dataset_dict["train"]
    labels = np.asarray(train[metadata.label_column]) if metadata.task == "classification" else None
    if redraw is not None:
        indices = redraw_labeled(labels, len(train), fraction=redraw.fraction, per_class=redraw.per_class, seed=redraw.seed)
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
    return [int(i) for i in indices]


def apply_labeled_split(dataset_dict, metadata, labeled: list[int]):
    """Write the chosen labelled rows into the train split's labeled column (what the loaders read)."""
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


def labeled_target_stats(dataset_dict, metadata, labeled: list[int]):
    """Per-target mean and unbiased std over the labelled train rows (the AFLW protocol), float32 tensors."""
    import torch

    values = np.asarray(dataset_dict["train"].select(labeled)[metadata.label_column], dtype=np.float64)
    values = values.reshape(len(labeled), -1)
    if len(labeled) < 2:
        raise SplitError("standardize_targets needs at least 2 labelled rows")
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
