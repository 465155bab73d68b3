"""Zero-shot classification: class embeddings from prompt-template ensembles, top-1/top-5."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from clipjax.evals.embed import embed_images, embed_texts
from clipjax.models.clip import CLIP


def zero_shot_weights(model: CLIP, variables: Any, tokenizer: Callable, classnames: Sequence[str],
                      templates: Sequence[str]) -> np.ndarray:
    """``e c`` classifier: per class, the normalised mean of its normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(model, variables, tokenizer(texts)).reshape(len(classnames), len(templates), -1)
    w = emb.mean(axis=1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    return w.T


def accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    order = np.argsort(-logits, axis=1)
    out = {}
    for k in ks:
        if k <= logits.shape[1]:
            out[f"top{k}"] = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
    return out


def evaluate(model: CLIP, variables: Any, tokenizer: Callable, images: np.ndarray, labels: np.ndarray,
             classnames: Sequence[str], templates: Sequence[str]) -> dict:
    """Zero-shot top-1/top-5 accuracy of ``images`` (n h w 3, normalised) with integer ``labels``."""
    w = zero_shot_weights(model, variables, tokenizer, classnames, templates)
    return accuracy(embed_images(model, variables, images) @ w, np.asarray(labels))
