"""Macro-averaged F1 over the classes seen in references or predictions."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Macro F1: the unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN). By default the "
    "classes are those appearing in references or predictions (scikit-learn's default); pass "
    "`labels` to fix the set. A class with no reference and no prediction scores 0."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): ground-truth class ids.
    labels (list of int, optional): classes to average over.
Returns:
    macro_f1 (float): in [0, 1].
"""


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if labels is None:
            labels = np.union1d(np.unique(references), np.unique(predictions))
        scores = []
        for c in labels:
            tp = np.sum((predictions == c) & (references == c))
            fp = np.sum((predictions == c) & (references != c))
            fn = np.sum((predictions != c) & (references == c))
            denominator = 2 * tp + fp + fn
            scores.append(2 * tp / denominator if denominator > 0 else 0.0)
        if not scores:
            return {"macro_f1": float("nan")}
        return {"macro_f1": float(np.mean(scores))}
