"""Balanced accuracy: mean per-class recall over the classes present in the references."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Balanced accuracy: the mean over classes present in the references of the recall "
    "(correct predictions of the class / references of the class), in [0, 1]. Classes that only "
    "appear among predictions are not averaged (as scikit-learn's balanced_accuracy_score)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): ground-truth class ids.
Returns:
    balanced_accuracy (float): in [0, 1].
"""


class BalancedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        classes = np.unique(references)
        if classes.size == 0:
            return {"balanced_accuracy": float("nan")}
        recalls = [np.mean(predictions[references == c] == c) for c in classes]
        return {"balanced_accuracy": float(np.mean(recalls))}
