"""NME (inter-ocular: GT landmarks 0 and 1) and failure rate (NME > 0.1) against a hand computation, as
Learning-to-impute's Regression/train-*.py `evaluate` computes them; the prediction pictures (confusion
matrix, landmark grid, regression scatter)."""

from __future__ import annotations

import numpy as np
import pytest

from modeling_stil.training.metrics import compute_metrics
from modeling_stil.training.plots import confusion_matrix, write_prediction_plots


def landmarks_by_hand():
    # image 0: eyes (0,0), (10,0): IOD 10; only landmark 0 is off by 1 px -> NME = (1/5) / 10 = 0.02
    gt0 = np.array([[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]], dtype=float)
    pred0 = gt0.copy()
    pred0[0] += [1.0, 0.0]
    # image 1: eyes (0,0), (0,4): IOD 4; every landmark off by (3, 4) = 5 px -> NME = 5 / 4 = 1.25 (fails)
    gt1 = np.array([[0, 0], [0, 4], [2, 2], [1, 3], [3, 3]], dtype=float)
    pred1 = gt1 + [3.0, 4.0]
    # image 2: IOD 10, every landmark off by 1 px -> NME exactly 0.1: NOT a failure (strictly > 0.1)
    gt2 = gt0.copy()
    pred2 = gt2 + [0.0, 1.0]
    references = np.stack([gt0, gt1, gt2]).reshape(3, 10)
    predictions = np.stack([pred0, pred1, pred2]).reshape(3, 10)
    return predictions, references


def test_nme_and_failure_rate_by_hand():
    predictions, references = landmarks_by_hand()
    metrics = compute_metrics("landmarks", predictions, references, num_labels=10)
    assert metrics["nme"] == pytest.approx((0.02 + 1.25 + 0.1) / 3)
    assert metrics["failure_rate"] == pytest.approx(1 / 3)
    assert metrics["mse"] == pytest.approx(np.mean((predictions - references) ** 2))
    # the normaliser is the GROUND TRUTH eye distance: moving the predicted eyes does not change it
    moved = predictions.copy()
    moved[0, 2:4] += [100.0, 0.0]
    assert compute_metrics("landmarks", moved, references, 10)["nme"] > metrics["nme"]
    # sample-weighted mean over batches == mean over all images (the original's AverageMeter)
    first = compute_metrics("landmarks", predictions[:2], references[:2], 10)["nme"]
    last = compute_metrics("landmarks", predictions[2:], references[2:], 10)["nme"]
    assert metrics["nme"] == pytest.approx((2 * first + 1 * last) / 3)


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix([0, 1, 1, 2, 0], [0, 1, 2, 2, -1], 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows true, columns predicted; -1 ignored


def test_prediction_pictures_are_written(tmp_path):
    logits = np.eye(3)[[0, 1, 1, 2]] * 5.0
    written = write_prediction_plots("classification", logits, np.array([0, 1, 2, 2]), tmp_path, num_labels=3,
                                     label_names=["a", "b", "c"], title="t")
    assert [p.name for p in written] == ["confusion_matrix.png"]
    predictions, references = landmarks_by_hand()
    images = np.random.default_rng(0).random((3, 1, 12, 12))
    written = write_prediction_plots("landmarks", predictions, references, tmp_path, images=images)
    assert [p.name for p in written] == ["landmarks.png"]
    assert write_prediction_plots("landmarks", predictions, references, tmp_path, images=None) == []
    written = write_prediction_plots("regression", np.array([1.0, 2.0]), np.array([1.5, 2.5]), tmp_path)
    assert [p.name for p in written] == ["predictions.png"]
    for name in ("confusion_matrix.png", "landmarks.png", "predictions.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
