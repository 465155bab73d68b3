"""Batched, jitted embedding of numpy images/tokens with a CLIP model (used by every evaluator)."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.clip import CLIP


@functools.lru_cache(maxsize=32)
def _encoder(model: CLIP, kind: str):
    method = CLIP.encode_image if kind == "image" else CLIP.encode_text
    return jax.jit(lambda variables, x: model.apply(variables, x, normalize=True, method=method))


def _batched(fn, variables: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs ``fn`` on fixed-size batches (the last one padded) so it compiles once."""
    n = len(x)
    if n == 0:
        raise ValueError("nothing to embed: the evaluation set is empty")
    out = []
    for i in range(0, n, batch_size):
        chunk = x[i:i + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(variables, jnp.asarray(chunk)))[:batch_size - pad])
    return np.concatenate(out)


def embed_images(model: CLIP, variables: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``images: n h w 3`` (normalised) -> ``n e`` L2-normalised float32."""
    return _batched(_encoder(model, "image"), variables, images, min(batch_size, len(images)))


def embed_texts(model: CLIP, variables: Any, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``tokens: n l`` int32 -> ``n e`` L2-normalised float32."""
    return _batched(_encoder(model, "text"), variables, tokens, min(batch_size, len(tokens)))
