"""Best-on-validation selection and early stopping: which metric, which direction, and when a value
is an improvement."""

from __future__ import annotations

import math

from ..methods.base import TASK_CLASSIFICATION, TASK_LANDMARKS, SSLMethod

LOWER_IS_BETTER = {"nme", "rmse", "mse", "mae", "loss", "failure_rate", "error"}


def default_best_metric(task: str, num_labels: int) -> tuple[str, bool]:
    """(metric name, greater_is_better) used for best-on-validation selection."""
    if task == TASK_CLASSIFICATION:
        return ("auroc", True) if num_labels == 2 else ("accuracy", True)
    if task == TASK_LANDMARKS:
        return "nme", False
    return "rmse", False


def selection_rule(method: SSLMethod, targs, task: str, num_labels: int) -> tuple[str, bool]:
    """(validation metric, greater_is_better) selecting the best model; ("last", True) keeps the last
    step. Precedence: --metric_for_best_model, then the method's ``selection``, then the task default."""
    if targs.metric_for_best_model:
        name = targs.metric_for_best_model
        if name == "last":
            return "last", True
        greater = targs.greater_is_better
        if greater is None:
            greater = name.split("/")[-1] not in LOWER_IS_BETTER
        return name, greater
    if method.selection == "last":
        return "last", True
    if method.selection is not None:
        name, greater = method.selection
        return name, greater if targs.greater_is_better is None else targs.greater_is_better
    name, greater = default_best_metric(task, num_labels)
    return name, greater if targs.greater_is_better is None else targs.greater_is_better


def selection_value(metric_name: str, metrics: dict[str, float], step: int) -> float:
    """The value an evaluation is selected by (the step itself for "last")."""
    if metric_name == "last":
        return float(step)
    value = metrics.get(metric_name)
    if value is None:
        raise KeyError(f"metric_for_best_model={metric_name!r} is not among the validation metrics {sorted(metrics)}")
    return value


def is_better(value: float | None, best: float | None, metric_name: str, greater_is_better: bool) -> bool:
    """Strictly better than ``best`` (the first of ties wins; NaN never does; "last" always does)."""
    if metric_name == "last":
        return True
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if greater_is_better else value < best


def early_stopping_update(progress, value: float | None, patience: int | None, min_delta: float,
                          metric_name: str, greater_is_better: bool) -> bool:
    """Lightning's EarlyStopping rule on ``progress.early_stopping_best`` / ``early_stopping_wait``:
    True once ``patience`` evaluations in a row failed to beat the best value by more than ``min_delta``."""
    if not patience or metric_name == "last":
        return False
    best = progress.early_stopping_best
    if value is None or math.isnan(value):
        improved = False
    elif best is None:
        improved = True
    else:
        improved = value - min_delta > best if greater_is_better else value + min_delta < best
    if improved:
        progress.early_stopping_best, progress.early_stopping_wait = float(value), 0
    else:
        progress.early_stopping_wait += 1
    return progress.early_stopping_wait >= patience
