"""Evaluation metrics, shipped as local `evaluate` modules so they work offline.

Each metric lives in ``<name>/<name>.py`` next to this file and loads with
``evaluate.load(metric_path(name))`` (no Hub access). `compute_metrics` is what the trainer and
scripts call; `MetricSet` accumulates an evaluation loop's (already gathered) batches.

| task | metrics (fractions, not percentages) |
|---|---|
| classification | accuracy, balanced_accuracy, macro_f1, auroc (binary: p(class 1); multi-class: OvR macro) |
| regression | mse, mae, rmse, r2 (plain numpy, mean over targets) |
| landmarks | nme (inter-ocular: GT landmarks 0 and 1), failure_rate (NME > 0.1), mse |
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "nme")
TASK_METRICS = {
    "classification": ("accuracy", "balanced_accuracy", "macro_f1", "auroc"),
    "regression": ("mse", "mae", "rmse", "r2"),
    "landmarks": ("nme", "failure_rate", "mse"),
}
# the metric each task selects models on by default, and whether higher is better
# Counters that travel with the metrics but are not scores (kept out of model cards' model-index).
DIAGNOSTIC_KEYS = ("num_samples", "auroc_skipped_classes")
DEFAULT_SELECTION_METRIC = {"classification": ("accuracy", True), "regression": ("mse", False), "landmarks": ("nme", False)}


def metric_path(name: str) -> str:
    """Folder of a local evaluate module (``evaluate.load`` accepts it offline)."""
    if name not in METRIC_NAMES:
        raise KeyError(f"unknown metric {name!r}; available: {METRIC_NAMES}")
    return str(METRICS_DIR / name)


@functools.lru_cache(maxsize=None)
def load_metric(name: str, config_name: str | None = None):
    """``evaluate.load`` of a local module, in memory (no Arrow cache files)."""
    import evaluate

    return evaluate.load(metric_path(name), config_name, keep_in_memory=True)


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()  # numpy has no bfloat16; keep float64 as float64
        return values.numpy()
    return np.asarray(values)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def compute_metrics(task: str, predictions, references, num_labels: int) -> dict[str, float]:
    """Metrics of a whole evaluation set.

    classification: ``predictions`` are logits (N, C) (AUROC from their softmax) or class ids (N,)
    (no AUROC); ``references`` class ids (N,). Rows whose reference is < 0 are ignored.
    regression: ``predictions`` (N,) or (N, T), ``references`` the same shape (reshaped).
    landmarks: ``predictions``/``references`` (N, 2K) flat x1, y1, ..., xK, yK.
    """
    predictions, references = _numpy(predictions), _numpy(references)
    if task == "classification":
        return _classification(predictions, references, num_labels)
    if task == "regression":
        return _regression(predictions.astype(np.float64), references.astype(np.float64))
    if task == "landmarks":
        predictions = predictions.astype(np.float64).reshape(len(predictions), -1)
        references = references.astype(np.float64).reshape(len(references), -1)
        out = load_metric("nme").compute(predictions=predictions, references=references)
        out["mse"] = float(np.mean((predictions - references) ** 2)) if len(references) else float("nan")
        return {key: float(value) for key, value in out.items()}
    raise ValueError(f"unknown task {task!r}")


def _classification(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> dict[str, float]:
    references = references.astype(np.int64).reshape(-1)
    keep = references >= 0
    references = references[keep]
    scores = None
    if predictions.ndim == 2:
        if predictions.shape[1] != num_labels:
            raise ValueError(f"logits have {predictions.shape[1]} columns but num_labels={num_labels}")
        predictions = predictions[keep].astype(np.float64)
        scores = _softmax(predictions)
        predicted = predictions.argmax(axis=1)
    else:
        predicted = predictions.astype(np.int64).reshape(-1)[keep]
    out = {}
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        out.update(load_metric(name).compute(predictions=predicted, references=references))
    if scores is not None and num_labels >= 2:
        if num_labels == 2:
            out.update(load_metric("auroc", "binary").compute(prediction_scores=scores[:, 1], references=references))
        else:
            out.update(load_metric("auroc", "multiclass").compute(prediction_scores=scores, references=references))
    return {key: float(value) for key, value in out.items()}


def _regression(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    predictions = predictions.reshape(len(predictions), -1)
    references = references.reshape(len(references), -1)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ")
    if len(references) == 0:
        return {name: float("nan") for name in TASK_METRICS["regression"]}
    errors = predictions - references
    mse = float(np.mean(errors**2))
    total = ((references - references.mean(axis=0)) ** 2).sum(axis=0)
    residual = (errors**2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)
    return {"mse": mse, "mae": float(np.mean(np.abs(errors))), "rmse": float(np.sqrt(mse)), "r2": float(np.mean(r2))}


class MetricSet:
    """Accumulates (gathered) evaluation batches, then `compute()`s the task's metrics.

    >>> metrics = MetricSet("classification", num_labels=3)
    >>> for logits, labels in batches: metrics.update(logits, labels)
    >>> metrics.compute()   # {"accuracy": ..., "balanced_accuracy": ..., "macro_f1": ..., "auroc": ...}
    """

    def __init__(self, task: str, num_labels: int):
        if task not in TASK_METRICS:
            raise ValueError(f"unknown task {task!r}")
        self.task = task
        self.num_labels = num_labels
        self.reset()

    def reset(self) -> None:
        self._predictions: list[np.ndarray] = []
        self._references: list[np.ndarray] = []

    def update(self, predictions, references) -> None:
        self._predictions.append(_numpy(predictions))
        self._references.append(_numpy(references))

    def __len__(self) -> int:
        return int(sum(len(r) for r in self._references))

    def compute(self) -> dict[str, float]:
        if not self._references:
            raise ValueError("MetricSet.compute() called before any update()")
        return compute_metrics(
            self.task, np.concatenate(self._predictions), np.concatenate(self._references), self.num_labels
        )
