"""The one splitter (`data_utils.splits.stratified_split`) gives every caller the indices its own splitter
gave before issue 20 unified them: synthetic train/validation/test, the builders' partition and labelled
draw, `select_labeled` and the trainer's redraw. The expected indices were written by the old code
(tests/golden/split_indices_before_issue20.json); datasets on disk and benchmark caches depend on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_utils.builders._common import stratified_partition
from data_utils.splits import SplitError, redraw_labeled, select_labeled, stratified_split
from data_utils.synthetic import _labeled_rows

BEFORE = json.loads((Path(__file__).parent / "golden" / "split_indices_before_issue20.json").read_text())
CASES = [(10, 2, 0), (23, 3, 1), (50, 4, 2), (101, 5, 3)]


def class_labels(n: int, k: int, seed: int) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=float)  # unbalanced: class c has weight c + 1
    return np.random.default_rng(1000 + seed).choice(k, size=n, p=p / p.sum())


def ints(values) -> list[int]:
    return [int(v) for v in values]


@pytest.mark.parametrize("n,k,s", CASES)
def test_select_labeled_and_redraw_keep_their_indices(n, k, s):
    labels = class_labels(n, k, s)
    assert ints(labels) == BEFORE[f"labels-{n}-{k}-{s}"]
    for f in (0.1, 0.25, 0.5):
        expected = BEFORE[f"select_labeled-fraction-{n}-{k}-{s}-{f}"]
        if expected == "SplitError":
            with pytest.raises(SplitError):
                select_labeled(labels, fraction=f, seed=s)
        else:
            assert ints(select_labeled(labels, fraction=f, seed=s)) == expected
            assert ints(redraw_labeled(labels, n, fraction=f, seed=s)) == expected
    assert ints(select_labeled(labels, per_class=2, seed=s)) == BEFORE[f"select_labeled-per_class-{n}-{k}-{s}"]
    assert ints(select_labeled(labels, num_labeled=k + 3, seed=s)) == BEFORE[f"select_labeled-num_labeled-{n}-{k}-{s}"]
    for f in (0.1, 0.33):  # no classes (regression, landmarks): the trainer's uniform redraw
        assert ints(redraw_labeled(None, n, fraction=f, seed=s)) == BEFORE[f"job_redraw-{n}-{s}-{f}"]


@pytest.mark.parametrize("n,k,s", CASES)
def test_synthetic_splits_keep_their_indices(n, k, s):
    labels = class_labels(n, k, s)
    for vf, tf in ((0.1, 0.2), (0.15, 0.15)):
        test, validation, train = stratified_split(labels, [tf, vf], rounding="class_share", rng=np.random.default_rng(s))
        assert {"train": ints(train), "validation": ints(validation), "test": ints(test)} == \
            BEFORE[f"synthetic_stratified-{n}-{k}-{s}-{vf}-{tf}"]
        test, validation, train = stratified_split(None, [tf, vf], rounding="overall_share", num_rows=n,
                                                   rng=np.random.default_rng(s))
        assert {"train": ints(train), "validation": ints(validation), "test": ints(test)} == \
            BEFORE[f"synthetic_random-{n}-{s}-{vf}-{tf}"]
    for f in (0.05, 0.3):
        assert ints(_labeled_rows(labels, f, s + 1, stratified=True)[0]) == BEFORE[f"synthetic_labeled-stratified-{n}-{k}-{s}-{f}"]
        assert ints(_labeled_rows(labels, f, s + 1, stratified=False)[0]) == BEFORE[f"synthetic_labeled-random-{n}-{s}-{f}"]


@pytest.mark.parametrize("n,k,s", CASES)
def test_builder_partition_keeps_its_indices(n, k, s):
    names = np.array([f"c{c}" for c in class_labels(n, k, s)], dtype=object)[::-1].copy()  # first seen != sorted
    for fractions in ([0.2, 0.1], [0.5], [0.15, 0.15, 0.3]):
        for stratify in (True, False):
            parts = stratified_partition(list(names), fractions, seed=s, stratify=stratify)
            assert [ints(p) for p in parts] == BEFORE[f"builders_partition-{n}-{k}-{s}-{fractions}-{stratify}"]


@pytest.mark.parametrize("m,s", [(10, 0), (37, 1), (120, 2)])
def test_builder_unstratified_labelled_draw_keeps_its_indices(m, s):
    for f in (0.1, 0.33):
        before = BEFORE[f"builders_labeled_random-{m}-{s}-{f}"]
        candidates = np.asarray(before["candidates"])
        drawn, _ = stratified_partition([0] * candidates.size, [f], seed=s, stratify=False)
        assert ints(candidates[drawn]) == before["labeled"]


def test_stratified_split_names_its_rounding():
    with pytest.raises(ValueError, match="rounding must be one of"):
        stratified_split([0, 1], [0.5], rounding="nearest", rng=np.random.default_rng(0))
