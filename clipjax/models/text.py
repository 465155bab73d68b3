"""CLIP text tower (open_clip ``TextTransformer`` with argmax/EOT pooling).

token embedding + learned positional embedding -> causal transformer -> ``ln_final`` ->
features at the EOT position (the largest token id in each row, as in CLIP's BPE where
``<end_of_text>`` has the highest id) -> ``text_projection``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import LayerNorm, Transformer, make_causal_mask

Dtype = Any


class TextTransformer(nn.Module):
    """``tokens: b l`` (int, ``l <= context_length``) -> ``b output_dim`` text features."""
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    scan: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout in CLIP's text tower; kept for a uniform tower signature
        if tokens.ndim != 2:
            raise ValueError(f"TextTransformer expects tokens of shape (batch, length), got {tokens.shape}; "
                             "use clipjax.tokenizer.tokenize(texts).")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        b, l = tokens.shape
        if l > self.context_length:
            raise ValueError(f"tokens have length {l} > context_length={self.context_length}; tokenize with "
                             f"context_length={self.context_length} (truncate).")
        w = self.width
        emb = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, w), self.param_dtype)
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), ("length", "embed")), (self.context_length, w), self.param_dtype)
        x = jnp.take(emb, tokens, axis=0).astype(self.dtype) + pos[:l].astype(self.dtype)
        # Causal attention: positions after the EOT never influence the pooled feature, so a
        # shorter (unpadded) context gives the same result as the full one.
        x = Transformer(self.layers, w, self.heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                        scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision, name="transformer")(
                            x, make_causal_mask(l))
        eot = jnp.argmax(tokens, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        pooled = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final")(pooled)
        proj = self.param("text_projection", nn.with_logical_partitioning(
            nn.initializers.normal(w ** -0.5), ("embed", None)), (w, self.output_dim), self.param_dtype)
        return jnp.dot(pooled, proj.astype(self.dtype), precision=self.precision)


def trim_padding(tokens, multiple: int = 16):
    """Host-side: drop the padding columns after the last EOT of the batch (numpy ``b l -> b l'``).

    Exact for :class:`TextTransformer`: attention is causal and features are pooled at the EOT,
    so nothing after the EOT can influence them. ``l'`` is rounded up to ``multiple`` (and capped at
    ``l``) so that a jitted encoder compiles for a handful of lengths only.
    """
    import numpy as np
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        return tokens
    needed = int(np.argmax(tokens, axis=-1).max()) + 1
    return tokens[:, :min(tokens.shape[1], -(-needed // multiple) * multiple)]
