"""Offline evaluate modules and compute_metrics against scikit-learn and hand computation."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error, r2_score, roc_auc_score

from modeling_stil.training.metrics import METRIC_NAMES, MetricSet, compute_metrics, load_metric, metric_path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


def random_classification(n=200, c=4, seed=0, absent=()):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, c, size=n)
    for cls in absent:
        references[references == cls] = (cls + 1) % c
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[references] * rng.random((n, 1))
    return logits, references


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_each_module_loads_offline_by_path(name):
    import evaluate

    module = evaluate.load(metric_path(name), "multiclass" if name == "auroc" else None, keep_in_memory=True)
    assert isinstance(module, evaluate.EvaluationModule)
    assert module.name  # a real module, not a stub


def test_label_metrics_match_sklearn():
    logits, references = random_classification()
    predicted = logits.argmax(1)
    predicted[:5] = 5  # a class that appears only among predictions
    accuracy = load_metric("accuracy").compute(predictions=predicted, references=references)["accuracy"]
    balanced = load_metric("balanced_accuracy").compute(predictions=predicted, references=references)["balanced_accuracy"]
    macro_f1 = load_metric("macro_f1").compute(predictions=predicted, references=references)["macro_f1"]
    assert accuracy == pytest.approx(accuracy_score(references, predicted))
    with pytest.warns(UserWarning):  # sklearn warns about the prediction-only class
        expected_balanced = balanced_accuracy_score(references, predicted)
    assert balanced == pytest.approx(expected_balanced)
    assert macro_f1 == pytest.approx(f1_score(references, predicted, average="macro", zero_division=0))
    assert 0 < macro_f1 < accuracy_score(references, predicted) + 0.2


def test_binary_auroc_uses_probability_of_class_one():
    logits, references = random_classification(c=2, seed=1)
    out = compute_metrics("classification", torch.tensor(logits), torch.tensor(references), num_labels=2)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert out["auroc"] == pytest.approx(roc_auc_score(references, probs[:, 1]))
    assert out["auroc"] > 0.6
    assert out["accuracy"] == pytest.approx(accuracy_score(references, logits.argmax(1)))
    # the module alone, binary config, and by hand on a tiny example with a tie
    auroc = load_metric("auroc", "binary")
    assert auroc.compute(prediction_scores=[0.1, 0.4, 0.4, 0.8], references=[0, 1, 0, 1])["auroc"] == pytest.approx(
        (1 + 0.5 + 1 + 1) / 4
    )


def test_auroc_ties_match_sklearn():
    rng = np.random.default_rng(6)
    references = rng.integers(0, 3, size=300)
    scores = np.round(rng.random((300, 3)) + 0.4 * np.eye(3)[references], 1)  # many exact ties
    scores = scores / scores.sum(1, keepdims=True)
    binary = load_metric("auroc", "binary").compute(prediction_scores=scores[:, 1], references=references == 1)
    assert binary["auroc"] == pytest.approx(roc_auc_score(references == 1, scores[:, 1]))
    multi = load_metric("auroc", "multiclass").compute(prediction_scores=scores, references=references)
    assert multi["auroc"] == pytest.approx(roc_auc_score(references, scores, multi_class="ovr", average="macro"))


def test_multiclass_auroc_ovr_macro_and_absent_classes():
    logits, references = random_classification(c=4, seed=2)
    out = compute_metrics("classification", logits, references, num_labels=4)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert out["auroc"] == pytest.approx(roc_auc_score(references, probs, multi_class="ovr", average="macro"))
    assert out["auroc_skipped_classes"] == 0
    # class 2 never appears in the references: skipped with a warning, no crash
    logits, references = random_classification(c=4, seed=3, absent=(2,))
    with pytest.warns(UserWarning, match=r"\[2\]"):
        out = compute_metrics("classification", logits, references, num_labels=4)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean([roc_auc_score(references == c, probs[:, c]) for c in (0, 1, 3)])
    assert out["auroc"] == pytest.approx(expected)
    assert out["auroc_skipped_classes"] == 1


def test_class_id_predictions_and_ignored_rows():
    out = compute_metrics("classification", np.array([0, 1, 1, 2]), np.array([0, 1, -1, 1]), num_labels=3)
    assert "auroc" not in out
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError):
        compute_metrics("classification", np.zeros((3, 2)), np.zeros(3), num_labels=3)


def test_nme_by_hand():
    # two landmarks 0 and 1 at distance 10 (inter-ocular), a third landmark
    references = np.array([[0.0, 0.0, 10.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0, 2.0, 2.0]])
    predictions = references.copy()
    predictions[0, 4:] += [3.0, 4.0]  # landmark 2 off by 5 -> NME = 5 / 3 / 10 = 1/6
    predictions[1, 0] += 0.3  # landmark 0 off by 0.3 -> NME = 0.3 / 3 / 4 = 0.025
    out = load_metric("nme").compute(predictions=predictions, references=references)
    assert out["nme"] == pytest.approx((1 / 6 + 0.025) / 2)
    assert out["failure_rate"] == pytest.approx(0.5)
    via = compute_metrics("landmarks", torch.tensor(predictions), torch.tensor(references), num_labels=6)
    assert via["nme"] == pytest.approx(out["nme"]) and via["failure_rate"] == 0.5
    assert via["mse"] == pytest.approx((9 + 16 + 0.09) / 12)
    with pytest.raises(ValueError):
        load_metric("nme").compute(predictions=predictions[:, :5], references=references[:, :5])


def test_regression_matches_sklearn():
    rng = np.random.default_rng(4)
    references = rng.normal(size=(50, 2))
    predictions = references + 0.3 * rng.normal(size=(50, 2))
    out = compute_metrics("regression", predictions, references, num_labels=2)
    assert out["mae"] == pytest.approx(mean_absolute_error(references, predictions))
    assert out["r2"] == pytest.approx(r2_score(references, predictions))
    assert out["rmse"] == pytest.approx(math.sqrt(out["mse"]))


def test_metric_set_accumulates_batches():
    logits, references = random_classification(n=90, c=3, seed=5)
    metrics = MetricSet("classification", num_labels=3)
    for start in range(0, 90, 32):
        metrics.update(torch.tensor(logits[start : start + 32]), torch.tensor(references[start : start + 32]))
    assert len(metrics) == 90
    assert metrics.compute() == pytest.approx(compute_metrics("classification", logits, references, 3))
    metrics.reset()
    with pytest.raises(ValueError):
        metrics.compute()
    with pytest.raises(ValueError):
        MetricSet("segmentation", 2)
