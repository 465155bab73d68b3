"""CLIP Vision Transformer image tower (open_clip ``VisionTransformer`` semantics).

patches (conv without bias, as a patch reshape + matmul) -> prepend class token -> add learned
positional embedding -> [patch dropout, training only] -> ``ln_pre`` -> transformer ->
``ln_post`` on the class token -> ``proj``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import LayerNorm, Transformer

Dtype = Any


def patch_dropout(x: jax.Array, drop: float, rng: jax.Array) -> jax.Array:
    """FLIP patch dropout: keep a random ``max(1, int(n * (1 - drop)))`` of the patch tokens.

    ``x: b (1 + n) d`` with the class token first (always kept) -> ``b (1 + keep) d``.
    """
    cls_tok, patches = x[:, :1], x[:, 1:]
    b, n, _ = patches.shape
    keep = max(1, int(n * (1.0 - drop)))
    noise = jax.random.normal(rng, (b, n))
    idx = jax.lax.top_k(noise, keep)[1]  # b keep
    kept = jnp.take_along_axis(patches, idx[..., None], axis=1)
    return jnp.concatenate([cls_tok, kept], axis=1)


class VisionTransformer(nn.Module):
    """``images: b h w c`` (normalised, NHWC) -> ``b output_dim`` image features."""
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    patch_dropout: float = 0.0  # fraction of patches dropped in training (keep ratio = 1 - this)
    scan: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        s, p, g, w = self.image_size, self.patch_size, self.grid_size, self.width
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"VisionTransformer expects images of shape (batch, {s}, {s}, 3) (NHWC, "
                             f"already normalised), got {images.shape}. Resize/crop with "
                             "clipjax.preprocess.preprocess_image(img, image_size).")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}.")
        b = images.shape[0]
        std = w ** -0.5
        kernel = self.param("patch_embed", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
            ("height", "width", "conv_in", "embed")), (p, p, 3, w), self.param_dtype)
        # A stride-p conv with a p x p kernel is a matmul over non-overlapping patches.
        x = images.astype(self.dtype).reshape(b, g, p, g, p, 3)
        x = jnp.einsum("bgphqc,pqcd->bghd", x, kernel.astype(self.dtype),
                       precision=self.precision).reshape(b, g * g, w)

        cls_emb = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(std), ("embed",)), (w,), self.param_dtype)
        pos_emb = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(std), ("length", "embed")), (g * g + 1, w), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_emb.astype(self.dtype), (b, 1, w)), x], axis=1)
        x = x + pos_emb.astype(self.dtype)
        if train and self.patch_dropout > 0:
            x = patch_dropout(x, self.patch_dropout, self.make_rng("dropout"))

        x = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_pre")(x)
        x = Transformer(self.layers, w, self.heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                        scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision, name="transformer")(x)
        # ln_post is per-token, so normalising only the class token is the same as open_clip.
        pooled = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.with_logical_partitioning(
            nn.initializers.normal(std), ("embed", None)), (w, self.output_dim), self.param_dtype)
        return jnp.dot(pooled, proj.astype(self.dtype), precision=self.precision)
