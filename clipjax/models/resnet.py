"""CLIP ModifiedResNet image tower (open_clip ``ModifiedResNet`` semantics), NHWC.

Differences from a torchvision ResNet, as in the CLIP paper:
- a 3-conv stem (3x3 convs, the first with stride 2) followed by a 2x2 average pool;
- anti-aliased strided blocks: a ``stride x stride`` average pool *before* the (stride 1) conv,
  both in the main path and in the downsample path;
- attention pooling instead of global average pooling: the spatial mean is prepended as a
  query token, with its own positional embedding and q/k/v/c projections.

BatchNorm runs in inference mode on its running statistics (collection ``batch_stats``, carried
like params), also with ``train=True``: that is how CLIP ResNets are fine-tuned and keeps the
train step free of mutable state. Set ``batchnorm_train=True`` to use batch statistics when
``train=True`` (then ``apply(..., mutable=['batch_stats'])``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _conv(features, kernel, stride, dtype, param_dtype, precision, name):
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.kaiming_normal(), ("height", "width", "conv_in", "conv_out")),
                   name=name)


def _bn(train, dtype, param_dtype, name, zero_scale=False):
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        name=name)


def _avg_pool(x, k):
    return nn.avg_pool(x, (k, k), strides=(k, k)) if k > 1 else x


class Bottleneck(nn.Module):
    """``x: b h w c -> b h/stride w/stride 4*planes``."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        """``train`` here means "BatchNorm uses batch statistics"."""
        conv = lambda f, k, name: _conv(f, k, 1, self.dtype, self.param_dtype, self.precision, name)  # noqa
        bn = lambda name, zero=False: _bn(train, self.dtype, self.param_dtype, name, zero)  # noqa
        out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(bn("bn2")(conv(self.planes, 3, "conv2")(out)))
        out = _avg_pool(out, self.stride)
        # Zero-init of the last BN scale (as open_clip) makes each block start as identity.
        out = bn("bn3", zero=True)(conv(4 * self.planes, 1, "conv3")(out))
        identity = x
        if self.stride > 1 or x.shape[-1] != 4 * self.planes:
            identity = bn("downsample_bn")(conv(4 * self.planes, 1, "downsample_conv")(_avg_pool(x, self.stride)))
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """``x: b h w c -> b output_dim`` via multi-head attention of the mean token over all tokens."""
    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)  # b (1+hw) c
        pos = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(c ** -0.5), ("length", "embed")), (h * w + 1, c), self.param_dtype)
        x = x + pos.astype(self.dtype)

        def dense(features, name):
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c ** -0.5),
                                                                     ("embed", "mlp")),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name=name)

        nh = self.num_heads
        if c % nh:
            raise ValueError(f"AttentionPool2d width {c} is not divisible by num_heads={nh}.")
        hd = c // nh
        q = dense(c, "q_proj")(x[:, :1]).reshape(b, 1, nh, hd)  # only the pooled token is needed
        k = dense(c, "k_proj")(x).reshape(b, h * w + 1, nh, hd)
        v = dense(c, "v_proj")(x).reshape(b, h * w + 1, nh, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision,
                            preferred_element_type=jnp.float32) * hd ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, c)
        return nn.Dense(self.output_dim, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(c ** -0.5),
                                                                 ("mlp", "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        name="c_proj")(out)


class ModifiedResNet(nn.Module):
    """``images: b h w c`` (normalised, NHWC) -> ``b output_dim`` image features."""
    image_size: int
    layers: Sequence[int]
    width: int
    heads: int
    output_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    batchnorm_train: bool = False  # True: BatchNorm uses (and updates) batch statistics when train=True

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"ModifiedResNet expects images of shape (batch, {s}, {s}, 3) (NHWC, already "
                             f"normalised), got {images.shape}. Resize/crop with "
                             "clipjax.preprocess.preprocess_image(img, image_size).")
        if len(self.layers) != 4:
            raise ValueError(f"ModifiedResNet needs 4 stage depths, got layers={self.layers}.")
        x = images.astype(self.dtype)
        w = self.width
        train = train and self.batchnorm_train
        for i, (features, stride) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
            x = _conv(features, 3, stride, self.dtype, self.param_dtype, self.precision, f"conv{i}")(x)
            x = nn.relu(_bn(train, self.dtype, self.param_dtype, f"bn{i}")(x))
        x = _avg_pool(x, 2)
        for stage, depth in enumerate(self.layers):
            planes = w * 2 ** stage
            for j in range(depth):
                stride = 2 if (stage > 0 and j == 0) else 1
                x = Bottleneck(planes, stride, self.dtype, self.param_dtype, self.precision,
                               name=f"layer{stage + 1}_{j}")(x, train)
        return AttentionPool2d(self.heads, self.output_dim, self.dtype, self.param_dtype, self.precision,
                               name="attnpool")(x)
