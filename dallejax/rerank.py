"""Rerank generated images with a CLIP model (paper, sec. 2.5: keep the best k of N samples).

The score of an image is the cosine similarity between CLIP's normalised image and text
embeddings (a monotone function of CLIP's logit, so the ranking is the same). Images are the
dVAE's output (``n h w 3`` float in [0, 1], or uint8); they are brought to CLIP's input the way
CLIP's eval transform does it (bicubic resize of the short side, centre crop, CLIP mean/std),
here with ``jax.image.resize`` (antialiased bicubic) so the whole scoring runs on device. Pass
``preprocess`` to use another transform.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.clip import CLIP

Array = jax.Array

__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_preprocess", "clip_scores", "rerank"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: Array, image_size: int) -> Array:
    """``images: n h w 3`` in [0, 1] (float) or uint8 -> ``n s s 3`` normalised float32, ``s = image_size``."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be n h w 3 (NHWC RGB), got shape {images.shape}.")
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    images = images.astype(jnp.float32)
    n, h, w, _ = images.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (nh, nw) != (h, w):
        images = jax.image.resize(images, (n, nh, nw, 3), method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    images = jnp.clip(images[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_scores(model: CLIP, variables: Any, images: Array, text_tokens: Array,
                preprocess: Optional[Callable[[Array], Array]] = None) -> Array:
    """Cosine similarity of each image with the caption.

    ``images: n h w 3``; ``text_tokens``: CLIP token ids ``l`` or ``1 l`` (one caption for all
    images) or ``n l`` (one per image). Returns ``n`` float32.
    """
    if not isinstance(model, CLIP):
        raise ValueError(f"clip_scores needs a clipjax CLIP model, got {type(model).__name__}.")
    if "params" not in variables:
        variables = {"params": variables}
    text_tokens = jnp.asarray(text_tokens, jnp.int32)
    if text_tokens.ndim == 1:
        text_tokens = text_tokens[None]
    size = model.config.vision.image_size
    pixels = preprocess(images) if preprocess is not None else clip_preprocess(images, size)
    img = model.apply(variables, pixels, normalize=True, method=CLIP.encode_image)
    txt = model.apply(variables, text_tokens, normalize=True, method=CLIP.encode_text)
    if txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"text_tokens has {txt.shape[0]} rows for {img.shape[0]} images; pass one caption "
                         "or one per image.")
    return jnp.sum(img * txt, axis=-1)


def rerank(model: CLIP, variables: Any, images: Array, text_tokens: Array, keep: int,
           preprocess: Optional[Callable[[Array], Array]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``keep`` best images (highest CLIP score first) and their scores.

    ``images: n h w 3``; ``text_tokens``: one caption (``l`` or ``1 l``). Returns ``(order: k, scores: k)``.
    """
    n = np.shape(images)[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in [1, {n}] (the number of images), got {keep}.")
    scores = np.asarray(clip_scores(model, variables, images, text_tokens, preprocess))
    order = np.argsort(-scores, kind="stable")[:keep]
    return order, scores[order]
