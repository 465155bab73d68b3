"""Image<->text retrieval recall@K (images may have several captions, as in COCO/Flickr)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from clipjax.evals.embed import embed_images, embed_texts
from clipjax.models.clip import CLIP


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict:
    """``text_to_image[j]`` is the index of the image caption j describes."""
    sims = image_emb @ text_emb.T                                   # n_img n_txt
    text_to_image = np.asarray(text_to_image)
    out = {}
    # image -> text: the rank of the best-ranked correct caption
    order_i = np.argsort(-sims, axis=1)
    correct_i = text_to_image[order_i] == np.arange(len(image_emb))[:, None]
    first_i = correct_i.argmax(axis=1)
    # text -> image: the rank of its image
    order_t = np.argsort(-sims.T, axis=1)
    first_t = (order_t == text_to_image[:, None]).argmax(axis=1)
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(first_i < k))
        out[f"t2i_R@{k}"] = float(np.mean(first_t < k))
    return out


def evaluate(model: CLIP, variables: Any, images: np.ndarray, tokens: np.ndarray,
             text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    return recall_at_k(embed_images(model, variables, images), embed_texts(model, variables, tokens),
                       text_to_image, ks)
