"""A linear probe of frozen features: is a pretrained representation useful for the labels?"""

from __future__ import annotations

import numpy as np


def linear_probe_accuracy(train_features, train_labels, eval_features, eval_labels) -> dict[str, float]:
    """Logistic regression on frozen features (standardised; deterministic): accuracy on held-out rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, x_eval = np.asarray(train_features, dtype=np.float64), np.asarray(eval_features, dtype=np.float64)
    y_train, y_eval = np.asarray(train_labels).reshape(-1), np.asarray(eval_labels).reshape(-1)
    if len(np.unique(y_train)) < 2:
        return {"probe_accuracy": float("nan")}
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000, C=1.0).fit(scaler.transform(x_train), y_train)
    return {"probe_accuracy": float((probe.predict(scaler.transform(x_eval)) == y_eval).mean()),
            "probe_train_rows": float(len(y_train))}
