"""Landmark normalised mean error (inter-ocular) and failure rate."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Normalised mean error for landmarks given as flat vectors x1, y1, ..., xK, yK: per example, "
    "the mean over the K landmarks of the Euclidean error divided by the distance between ground-"
    "truth landmarks 0 and 1 (inter-ocular by convention; `normalization_indices` changes the pair). "
    "nme is the mean over examples; failure_rate is the fraction of examples whose NME exceeds "
    "`failure_threshold` (0.1). Both are fractions, not percentages."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): predicted landmarks, length 2K.
    references (list of list of float): ground-truth landmarks, length 2K.
    normalization_indices (tuple of int): the two landmarks whose distance normalises (0, 1).
    failure_threshold (float): an example fails when its NME > this (0.1).
Returns:
    nme (float), failure_rate (float).
"""


class NME(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, normalization_indices=(0, 1), failure_threshold=0.1):
        predictions = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references, dtype=np.float64)
        if predictions.shape != references.shape or predictions.ndim != 2 or predictions.shape[1] % 2:
            raise ValueError(f"landmarks must be (N, 2K) arrays of equal shape, got {predictions.shape} and {references.shape}")
        if predictions.shape[0] == 0:
            return {"nme": float("nan"), "failure_rate": float("nan")}
        predicted = predictions.reshape(len(predictions), -1, 2)
        truth = references.reshape(len(references), -1, 2)
        first, second = normalization_indices
        normaliser = np.linalg.norm(truth[:, first] - truth[:, second], axis=-1)
        normaliser = np.maximum(normaliser, 1e-12)
        per_example = np.linalg.norm(predicted - truth, axis=-1).mean(axis=1) / normaliser
        return {"nme": float(per_example.mean()), "failure_rate": float(np.mean(per_example > failure_threshold))}
