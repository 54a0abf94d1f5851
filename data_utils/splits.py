"""Semi-supervised splits: which training rows keep their label.

The chosen indices are written with the dataset (the ``labeled`` column of ``train`` plus
``labeled_indices`` in ``stil_dataset.json``) so every run that uses the dataset sees the same split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class SplitError(ValueError):
    pass


def select_labeled(
    labels: Sequence[int],
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
    min_per_class: int = 1,
) -> np.ndarray:
    """Sorted indices of the rows that keep their label, stratified by class.

    Exactly one of ``fraction`` (of all rows), ``num_labeled`` (total count) or ``per_class`` is
    given. With a fraction/count, every class first gets ``min_per_class`` rows (so no class is left
    without a labelled example), then the remainder is spread proportionally to class frequency
    (largest remainders first), drawn at random with ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise SplitError("labels must be a non-empty 1-D sequence of class ids")
    if sum(x is not None for x in (fraction, per_class, num_labeled)) != 1:
        raise SplitError("give exactly one of fraction, per_class or num_labeled")
    if np.any(labels < 0):
        raise SplitError("every training row needs a class id >= 0 to make a stratified split")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}

    if per_class is not None:
        if per_class < 1:
            raise SplitError(f"per_class must be >= 1, got {per_class}")
        short = [int(c) for c, n in zip(classes, counts) if n < per_class]
        if short:
            raise SplitError(f"classes {short} have fewer than per_class={per_class} rows")
        take = {c: per_class for c in classes}
    else:
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise SplitError(f"fraction must be in (0, 1], got {fraction}")
            total = int(round(fraction * labels.size))
        else:
            total = int(num_labeled)
        minimum = len(classes) * min_per_class
        if total < minimum:
            raise SplitError(
                f"{total} labelled rows cannot cover {len(classes)} classes with {min_per_class} each; "
                f"raise the fraction/count to at least {minimum}"
            )
        if total > labels.size:
            raise SplitError(f"asked for {total} labelled rows but the split has only {labels.size}")
        take = {c: min(min_per_class, n) for c, n in zip(classes, counts)}
        remaining = total - sum(take.values())
        spare = {c: n - take[c] for c, n in zip(classes, counts)}
        spare_total = sum(spare.values())
        if remaining > 0 and spare_total > 0:
            quota = {c: remaining * spare[c] / spare_total for c in classes}
            extra = {c: min(spare[c], int(np.floor(quota[c]))) for c in classes}
            left = remaining - sum(extra.values())
            order = sorted(classes, key=lambda c: (-(quota[c] - np.floor(quota[c])), rng.random()))
            for c in order:
                if left == 0:
                    break
                if extra[c] < spare[c]:
                    extra[c] += 1
                    left -= 1
            for c in classes:
                take[c] += extra[c]
    chosen = np.concatenate([by_class[c][: take[c]] for c in classes])
    return np.sort(chosen)


def labeled_mask(num_rows: int, indices: Sequence[int]) -> np.ndarray:
    mask = np.zeros(num_rows, dtype=bool)
    mask[np.asarray(indices, dtype=np.int64)] = True
    return mask


def check_labeled_split(labels: Sequence[int], mask: Sequence[bool], num_classes: int | None = None) -> None:
    """Refuse splits a semi-supervised run cannot use: no labelled row, or a class without one."""
    labels = np.asarray(labels)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise SplitError(
            "the labelled set is empty: mark some training rows as labeled (the labeled column) or "
            "choose a labelled fraction / a labelled count per class"
        )
    classes = np.arange(num_classes) if num_classes is not None else np.unique(labels)
    present = set(np.unique(labels[mask]).tolist())
    absent = [int(c) for c in classes if int(c) not in present and (labels == c).any()]
    if absent:
        raise SplitError(
            f"classes {absent[:20]}{' ...' if len(absent) > 20 else ''} have no labelled training row; "
            "raise the labelled fraction or choose a labelled count per class so every class has one"
        )
