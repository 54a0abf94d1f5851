"""Top-1 accuracy (fraction of predictions equal to the reference), offline evaluate module."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: fraction of predicted class ids equal to the reference class ids, in [0, 1]."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): ground-truth class ids.
Returns:
    accuracy (float): in [0, 1].
"""


class Accuracy(evaluate.Metric):
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
        if references.size == 0:
            return {"accuracy": float("nan")}
        return {"accuracy": float(np.mean(predictions == references))}
