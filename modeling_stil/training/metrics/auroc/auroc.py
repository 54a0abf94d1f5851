"""Area under the ROC curve: binary (score of class 1) or multi-class one-vs-rest macro."""

import warnings

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "AUROC from the Mann-Whitney statistic with average ranks for ties. Config 'binary': one score "
    "per example (the probability of class 1). Config 'multiclass': one probability vector per "
    "example; the result is the unweighted mean over classes of the one-vs-rest AUROC. A class "
    "that is absent from the references (or is the only class present) has no defined one-vs-rest "
    "AUROC: it is skipped with a warning, and `auroc_skipped_classes` counts them. A vector of two "
    "probabilities in the multiclass config is scored as binary with the second column."
)
_KWARGS_DESCRIPTION = """
Args:
    prediction_scores: floats (binary) or lists of floats (multiclass), higher = more likely.
    references (list of int): ground-truth class ids.
Returns:
    auroc (float): in [0, 1] (NaN when no class can be scored).
    auroc_skipped_classes (int): classes left out of the macro average.
"""


def _ranks(values):
    """1-based ranks, ties get the average of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def binary_auroc(positive, scores):
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class AUROC(evaluate.Metric):
    def _info(self):
        if self.config_name == "multiclass":
            scores = datasets.Sequence(datasets.Value("float64"))
        else:
            scores = datasets.Value("float64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"prediction_scores": scores, "references": datasets.Value("int64")}),
        )

    def _compute(self, prediction_scores, references):
        references = np.asarray(references, dtype=np.int64)
        scores = np.asarray(prediction_scores, dtype=np.float64)
        if scores.ndim == 1:
            value = binary_auroc(references == 1, scores)
            return {"auroc": value, "auroc_skipped_classes": 0 if value == value else 1}
        if scores.shape[1] == 2:
            value = binary_auroc(references == 1, scores[:, 1])
            return {"auroc": value, "auroc_skipped_classes": 0 if value == value else 1}
        values, skipped = [], []
        for c in range(scores.shape[1]):
            value = binary_auroc(references == c, scores[:, c])
            if value == value:
                values.append(value)
            else:
                skipped.append(c)
        if skipped:
            warnings.warn(f"AUROC: classes {skipped} have no positive or no negative reference; left out of the macro average")
        return {"auroc": float(np.mean(values)) if values else float("nan"), "auroc_skipped_classes": len(skipped)}
