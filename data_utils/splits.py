"""Splits: which rows go to train / validation / test, and which training rows keep their label.

One splitter, `stratified_split`, serves them all: the synthetic datasets, the dataset builders, the
labelled subset (`select_labeled`) and the trainer's redraw of it (`draw_labeled`). It shuffles the
rows of each class with the caller's generator and cuts them into parts; how many rows of each class
a part gets is the ``rounding`` rule the caller names (`ROUNDINGS`). The rules differ because the
splits written with them (datasets on disk, benchmark caches, golden fixtures) must not change.

The chosen labelled indices are written with the dataset (the ``labeled`` column of ``train`` plus
``labeled_indices`` in ``stil_dataset.json``) so every run that uses the dataset sees the same split.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class SplitError(ValueError):
    pass


# How a part's size becomes a number of rows per class (``parts`` holds fractions for the first two,
# row counts for the last two):
#   "class_share"        each class takes round(fraction x its rows), at least one (synthetic train/val/test)
#   "overall_share"      a part takes round(fraction x all rows): each class the floor of its share, the
#                        leftover rows to the largest remainders, ties to the class met first (builders)
#   "count_min_per_class" a part takes that many rows: every class first ``min_per_class``, the rest spread
#                        over the classes' spare rows by largest remainder, ties drawn at random (labelled subset)
#   "count_per_class"    every class takes that many rows (labelled subset, ``per_class``)
ROUNDINGS = ("class_share", "overall_share", "count_min_per_class", "count_per_class")


def stratified_split(
    labels: Sequence[Any] | None,
    parts: Sequence[float],
    *,
    rounding: str,
    rng: np.random.Generator,
    num_rows: int | None = None,
    class_order: str = "sorted",
    min_per_class: int = 1,
) -> list[np.ndarray]:
    """Row positions cut into ``len(parts) + 1`` sorted parts: one per entry of ``parts``, the rest last.

    ``labels`` gives each row's class (``None``: one class of ``num_rows`` rows, an unstratified split).
    The rows of each class are shuffled with ``rng``, the classes taken in ``class_order`` ("sorted", or
    "first_seen" in the rows' order); each part takes the next rows of every class, as many as the
    ``rounding`` rule (`ROUNDINGS`) gives it."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if labels is None:
        classes = [np.arange(int(num_rows))]
    else:
        values = np.asarray(labels)
        keys = _first_seen(values) if class_order == "first_seen" else np.unique(values)
        classes = [np.flatnonzero(values == key) for key in keys]
    classes = [rng.permutation(rows) for rows in classes]
    sizes = np.array([rows.size for rows in classes])
    counts = _ALLOCATIONS[rounding](sizes, parts, rng, min_per_class)
    taken = [[] for _ in range(len(parts) + 1)]
    offsets = np.zeros(len(classes), dtype=np.int64)
    for k, per_class in enumerate(counts):
        for g, rows in enumerate(classes):
            taken[k].append(rows[offsets[g]: offsets[g] + per_class[g]])
        offsets += np.asarray(per_class, dtype=np.int64)
    for g, rows in enumerate(classes):
        taken[-1].append(rows[offsets[g]:])
    return [np.sort(np.concatenate(p).astype(np.int64)) if p else np.zeros(0, dtype=np.int64) for p in taken]


def _first_seen(values: np.ndarray) -> list:
    seen: dict = {}
    for value in values.tolist():
        seen.setdefault(value, None)
    return list(seen)


def _class_share(sizes, parts, rng, min_per_class):
    return [[max(1, int(round(fraction * n))) for n in sizes.tolist()] for fraction in parts]


def _overall_share(sizes, parts, rng, min_per_class):
    counts, offsets, n = [], np.zeros_like(sizes), int(sizes.sum())
    for fraction in parts:
        total = int(round(fraction * n))
        quota = fraction * sizes
        take = np.minimum(np.floor(quota).astype(int), sizes - offsets)
        left = total - int(take.sum())
        for g in np.argsort(-(quota - np.floor(quota)), kind="stable"):
            if left <= 0:
                break
            if offsets[g] + take[g] < sizes[g]:
                take[g] += 1
                left -= 1
        counts.append(take.tolist())
        offsets = offsets + take
    return counts


def _count_min_per_class(sizes, parts, rng, min_per_class):
    (total,) = parts
    sizes = sizes.tolist()
    take = [min(min_per_class, n) for n in sizes]
    remaining = int(total) - sum(take)
    spare = [n - t for n, t in zip(sizes, take)]
    spare_total = sum(spare)
    if remaining > 0 and spare_total > 0:
        quota = [remaining * s / spare_total for s in spare]
        extra = [min(s, int(np.floor(q))) for s, q in zip(spare, quota)]
        left = remaining - sum(extra)
        order = sorted(range(len(sizes)), key=lambda g: (-(quota[g] - np.floor(quota[g])), rng.random()))
        for g in order:
            if left == 0:
                break
            if extra[g] < spare[g]:
                extra[g] += 1
                left -= 1
        take = [t + e for t, e in zip(take, extra)]
    return [take]


def _count_per_class(sizes, parts, rng, min_per_class):
    (count,) = parts
    return [[int(count)] * len(sizes)]


_ALLOCATIONS = {"class_share": _class_share, "overall_share": _overall_share,
                "count_min_per_class": _count_min_per_class, "count_per_class": _count_per_class}


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
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    if per_class is not None:
        if per_class < 1:
            raise SplitError(f"per_class must be >= 1, got {per_class}")
        short = [int(c) for c, n in zip(classes, counts) if n < per_class]
        if short:
            raise SplitError(f"classes {short} have fewer than per_class={per_class} rows")
        return stratified_split(labels, [per_class], rounding="count_per_class", rng=rng)[0]
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
    return stratified_split(labels, [total], rounding="count_min_per_class", rng=rng, min_per_class=min_per_class)[0]


def redraw_labeled(labels: Sequence[int] | None, num_rows: int, *, fraction: float | None = None,
                   per_class: int | None = None, seed: int = 0) -> np.ndarray:
    """A run's redraw of a dataset's labelled rows (``--labeled_fraction`` / ``--labeled_per_class``).

    With class ``labels``: `select_labeled`. Without (regression, landmarks): ``round(fraction x rows)``
    rows (at least one) drawn uniformly with ``Generator.choice``, the draw runs have always used."""
    if labels is not None:
        return select_labeled(labels, fraction=fraction, per_class=per_class, seed=seed)
    if per_class is not None:
        raise SplitError("labeled_per_class needs a classification dataset; use labeled_fraction")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=max(1, int(round(fraction * num_rows))), replace=False))


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
