"""Linear probe: logistic regression on frozen, normalised image features."""
from __future__ import annotations

from typing import Any

import numpy as np

from clipjax.evals.embed import embed_images
from clipjax.models.clip import CLIP


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  c: float = 10.0, max_iter: int = 1000) -> float:
    from sklearn.linear_model import LogisticRegression
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear probe needs at least 2 classes in its training split")
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def evaluate(model: CLIP, variables: Any, train_images: np.ndarray, train_labels: np.ndarray,
             test_images: np.ndarray, test_labels: np.ndarray, c: float = 10.0) -> dict:
    tr = embed_images(model, variables, train_images)
    te = embed_images(model, variables, test_images)
    return {"accuracy": fit_and_score(tr, np.asarray(train_labels), te, np.asarray(test_labels), c)}
