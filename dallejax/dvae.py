"""The DALL-E discrete VAE (Ramesh et al. 2021): model, logit-Laplace ELBO and schedules.

Architecture (the released ``dall_e`` package, NHWC here):

* :class:`Encoder` - 7x7 input conv to ``n_hid`` channels, ``group_count`` groups of
  ``n_blk_per_group`` bottleneck residual blocks (group ``g`` has ``n_hid * 2**g`` channels),
  2x2 max-pool between groups, then ReLU + 1x1 conv to ``vocab_size`` logits. 256 px images
  give a 32x32 token grid (``image_size / 2**(group_count - 1)``).
* :class:`Decoder` - 1x1 conv from the one-hot (or relaxed) code to ``n_init`` channels, groups
  of blocks with ``n_hid * 2**(group_count - 1 - g)`` channels, nearest 2x upsampling between
  groups, then ReLU + 1x1 conv to ``2 * output_channels`` = logit-Laplace ``mu`` and ``ln b``.
* Residual block: ``skip(x) + post_gain * res(x)`` where ``res`` is four (ReLU, conv) pairs
  through ``n_out // 4`` hidden channels (encoder kernels 3,3,3,1; decoder 1,3,3,3),
  ``post_gain = 1 / (group_count * n_blk_per_group) ** 2`` and ``skip`` is a 1x1 conv when the
  width changes, else the identity.

The encoder sees pixels mapped by :func:`map_pixels` (``[0, 1] -> [eps, 1 - eps]``); the
decoder's reconstruction is ``unmap_pixels(sigmoid(mu))``.

Parameters (``kernel`` HWIO with logical axes ('height', 'width', 'conv_in', 'conv_out'),
``bias`` ('conv_out',); the vocabulary side of the encoder output / decoder input convs uses
'vocab')::

    encoder: input, group_{g}/block_{i}/{skip,conv_1..conv_4}, output
    decoder: input, group_{g}/block_{i}/{skip,conv_1..conv_4}, output

``dallejax.convert`` maps these to/from OpenAI's names.

Training objective (paper, sec. 2.1 and appendix A): the encoder's categorical posterior is
relaxed with Gumbel-softmax at temperature ``tau`` (no straight-through), the ELBO is
``E[log p(x | z)] - beta * KL(q(z | x) || uniform)`` with the logit-Laplace likelihood, ``tau``
is annealed 1 -> 1/16 and ``beta`` 0 -> 6.6 with cosine schedules. :func:`dvae_loss` is a pure
function ``(params, batch, rng, step, config) -> (loss, metrics)`` usable in a jitted step.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Array = jax.Array
Dtype = Any

__all__ = [
    "Conv", "ResBlock", "Encoder", "Decoder", "DVAE",
    "map_pixels", "unmap_pixels", "gumbel_softmax", "kl_to_uniform", "logit_laplace_nll",
    "cosine_schedule", "temperature_schedule", "kl_weight_schedule", "codebook_stats",
    "default_config", "model_from_config", "dvae_loss", "reconstruction_metrics", "forward_flops",
]

LOGIT_LAPLACE_EPS = 0.1


# ----------------------------------------------------------------------------- pixels
def map_pixels(x: Array, eps: float = LOGIT_LAPLACE_EPS) -> Array:
    """``[0, 1] -> [eps, 1 - eps]``: keeps ``logit(x)`` finite for the logit-Laplace."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Array, eps: float = LOGIT_LAPLACE_EPS) -> Array:
    """Inverse of :func:`map_pixels`, clipped to ``[0, 1]``."""
    return jnp.clip((x - eps) / (1 - 2 * eps), 0, 1)


# ----------------------------------------------------------------------------- layers
def _precision(p):
    if p is None or isinstance(p, jax.lax.Precision):
        return p
    return jax.lax.Precision[str(p).upper()]


def _conv_init(key, shape, dtype=jnp.float32):
    # N(0, 1 / fan_in) with fan_in = kh * kw * c_in, as the reference Conv2d.
    return jax.random.normal(key, shape, dtype) / math.sqrt(shape[0] * shape[1] * shape[2])


class Conv(nn.Module):
    """Square 'same' convolution with bias. ``x: b h w c_in -> b h w features``."""

    features: int
    kernel_size: int
    in_axis: str = "conv_in"
    out_axis: str = "conv_out"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_conv_init, ("height", "width", self.in_axis, self.out_axis)),
            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.out_axis,)),
                          (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if k == 1:  # a 1x1 conv is a matmul over channels (cheaper than conv on CPU)
            y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())),
                                    precision=_precision(self.precision))
        else:
            p = (k - 1) // 2
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_precision(self.precision))
        return y + bias.astype(self.dtype)


class ResBlock(nn.Module):
    """Bottleneck residual block: ``skip(x) + post_gain * res(x)``.

    ``x: b h w c_in -> b h w features``; ``res`` is (ReLU, conv) x 4 through ``features // 4``
    channels with kernel sizes ``kernel_sizes``.
    """

    features: int
    post_gain: float
    kernel_sizes: Sequence[int] = (3, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype,
                                 precision=self.precision)
        hidden = self.features // 4
        skip = x if x.shape[-1] == self.features else conv(self.features, 1, name="skip")(x)
        h = x
        widths = (hidden, hidden, hidden, self.features)
        for i, (w, k) in enumerate(zip(widths, self.kernel_sizes)):
            h = conv(w, k, name=f"conv_{i + 1}")(nn.relu(h))
        return skip.astype(self.dtype) + self.post_gain * h


class _Group(nn.Module):
    """``num_blocks`` residual blocks named ``block_1 ..`` (mirrors the reference groups)."""

    features: int
    num_blocks: int
    post_gain: float
    kernel_sizes: Sequence[int]
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        block = nn.remat(ResBlock) if self.remat else ResBlock
        for i in range(self.num_blocks):
            x = block(self.features, self.post_gain, tuple(self.kernel_sizes), dtype=self.dtype,
                      param_dtype=self.param_dtype, precision=self.precision,
                      name=f"block_{i + 1}")(x)
        return x


def _check_positive(module, *names):
    for name in names:
        if int(getattr(module, name)) < 1:
            raise ValueError(f"{type(module).__name__}.{name} must be >= 1, got {getattr(module, name)}")


class Encoder(nn.Module):
    """dVAE encoder. ``x: b h w c`` (pixels already mapped by :func:`map_pixels`) ->
    logits ``b (h/r) (w/r) vocab`` in float32, ``r = 2**(group_count - 1)``."""

    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_positive(self, "group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size")
        _check_images(x, self.input_channels, self.downsample, "Encoder")
        if (self.n_hid * 2 ** (self.group_count - 1)) % 4 or self.n_hid % 4:
            raise ValueError(f"Encoder.n_hid must be a multiple of 4, got {self.n_hid}")
        post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = Conv(self.n_hid, 7, name="input", **kw)(x)
        for g in range(self.group_count):
            x = _Group(self.n_hid * 2 ** g, self.n_blk_per_group, post_gain, (3, 3, 3, 1),
                       remat=self.remat, name=f"group_{g + 1}", **kw)(x)
            if g < self.group_count - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        # The reference keeps the logits conv in float32 even under mixed precision.
        x = Conv(self.vocab_size, 1, out_axis="vocab", dtype=jnp.float32,
                 param_dtype=self.param_dtype, precision=self.precision, name="output")(nn.relu(x))
        return x.astype(jnp.float32)


class _CodeInput(nn.Module):
    """The decoder's 1x1 input conv from a ``vocab``-channel code, in float32.

    ``z: b h w`` integer tokens (the one-hot conv is then a row gather) or ``b h w vocab`` float
    (one-hot or Gumbel-softmax relaxed codes) -> ``b h w features``.
    """

    features: int
    vocab_size: int
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_conv_init, ("height", "width", "vocab", "conv_out")),
            (1, 1, self.vocab_size, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        table = kernel[0, 0].astype(jnp.float32)
        if jnp.issubdtype(z.dtype, jnp.integer):
            y = jnp.take(table, z, axis=0)
        else:
            y = jax.lax.dot_general(z.astype(jnp.float32), table, (((z.ndim - 1,), (0,)), ((), ())),
                                    precision=_precision(self.precision))
        return y + bias.astype(jnp.float32)


def _upsample2(x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class Decoder(nn.Module):
    """dVAE decoder. ``z: b h w`` int tokens or ``b h w vocab`` float codes -> stats
    ``b (h*r) (w*r) (2*output_channels)`` float32: ``[..., :c]`` = mu (logit space),
    ``[..., c:]`` = ln b of the logit-Laplace, ``r = 2**(group_count - 1)``."""

    group_count: int = 4
    n_init: int = 128
    n_hid: int = 256
    n_blk_per_group: int = 2
    output_channels: int = 3
    vocab_size: int = 8192
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z: Array) -> Array:
        _check_positive(self, "group_count", "n_init", "n_hid", "n_blk_per_group", "output_channels",
                        "vocab_size")
        _check_codes(z, self.vocab_size)
        if self.n_hid % 4:
            raise ValueError(f"Decoder.n_hid must be a multiple of 4, got {self.n_hid}")
        post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = _CodeInput(self.n_init, self.vocab_size, param_dtype=self.param_dtype,
                       precision=self.precision, name="input")(z)
        for g in range(self.group_count):
            x = _Group(self.n_hid * 2 ** (self.group_count - 1 - g), self.n_blk_per_group, post_gain,
                       (1, 3, 3, 3), remat=self.remat, name=f"group_{g + 1}", **kw)(x)
            if g < self.group_count - 1:
                x = _upsample2(x)
        x = Conv(2 * self.output_channels, 1, name="output", **kw)(nn.relu(x))
        return x.astype(jnp.float32)


# ----------------------------------------------------------------------------- input checks
def _check_images(x, channels: int, multiple: int, where: str):
    if x.ndim != 4:
        raise ValueError(f"{where}: expected images b h w c (NHWC, rank 4), got shape {x.shape}")
    if x.shape[-1] != channels:
        hint = " (NCHW input? transpose to NHWC)" if x.shape[1] == channels else ""
        raise ValueError(f"{where}: expected {channels} channels in the last axis, got shape "
                         f"{x.shape}{hint}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{where}: height and width must be multiples of {multiple} "
                         f"(2**(group_count-1)), got {x.shape[1]}x{x.shape[2]}; resize or crop")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: expected float images in [0, 1], got dtype {x.dtype}; "
                         "convert uint8 with images.astype(np.float32) / 255")


def _check_codes(z, vocab_size: int):
    if jnp.issubdtype(z.dtype, jnp.integer):
        if z.ndim != 3:
            raise ValueError(f"Decoder: expected integer tokens b h w, got shape {z.shape}")
        if not isinstance(z, jax.core.Tracer):
            zn = np.asarray(z)
            if zn.size and (zn.min() < 0 or zn.max() >= vocab_size):
                raise ValueError(f"Decoder: token ids must be in [0, {vocab_size}), got range "
                                 f"[{zn.min()}, {zn.max()}]")
    elif z.ndim != 4 or z.shape[-1] != vocab_size:
        raise ValueError(f"Decoder: expected int tokens b h w or float codes b h w {vocab_size}, "
                         f"got shape {z.shape} dtype {z.dtype}")


# ----------------------------------------------------------------------------- DVAE
class DVAE(nn.Module):
    """Encoder + decoder pair with the pixel mapping. Params: ``{'encoder': .., 'decoder': ..}``.

    Methods (use with ``model.apply(variables, x, method=DVAE.encode)`` etc.):
      ``encoder_logits(images: b h w c in [0,1]) -> b h' w' vocab`` (f32)
      ``encode(images) -> tokens b h' w'`` (int32, argmax of the logits)
      ``decoder_stats(z: b h' w' int | b h' w' vocab float) -> b h w 2c`` (mu, ln b)
      ``decode(tokens) -> images b h w c`` in [0,1] (``unmap_pixels(sigmoid(mu))``)
      ``__call__(images, temperature, gumbel_rng=None) -> (logits, stats)``: the relaxed
      forward pass used in training (plain softmax at ``temperature`` when no rng).
    """

    group_count: int = 4
    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    input_channels: int = 3
    n_init: int = 128
    image_size: int = 256
    logit_laplace_eps: float = LOGIT_LAPLACE_EPS
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    def setup(self):
        common = dict(group_count=self.group_count, n_hid=self.n_hid,
                      n_blk_per_group=self.n_blk_per_group, vocab_size=self.vocab_size,
                      remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision)
        self.encoder = Encoder(input_channels=self.input_channels, **common)
        self.decoder = Decoder(n_init=self.n_init, output_channels=self.input_channels, **common)

    @property
    def token_grid(self) -> int:
        """Tokens per side for ``image_size`` inputs."""
        return self.image_size // 2 ** (self.group_count - 1)

    def encoder_logits(self, images: Array) -> Array:
        _check_images(images, self.input_channels, 2 ** (self.group_count - 1), "DVAE.encode")
        return self.encoder(map_pixels(images.astype(jnp.float32), self.logit_laplace_eps))

    def encode(self, images: Array) -> Array:
        return jnp.argmax(self.encoder_logits(images), axis=-1).astype(jnp.int32)

    def decoder_stats(self, z: Array) -> Array:
        return self.decoder(z)

    def decode(self, tokens: Array) -> Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"DVAE.decode expects integer tokens b h w, got dtype {tokens.dtype}; "
                             "use decoder_stats for soft codes")
        stats = self.decoder(tokens)
        return unmap_pixels(jax.nn.sigmoid(stats[..., :self.input_channels]), self.logit_laplace_eps)

    def __call__(self, images: Array, temperature: float | Array = 1.0,
                 gumbel_rng: Array | None = None):
        logits = self.encoder_logits(images)
        if gumbel_rng is None:
            z = jax.nn.softmax(logits / temperature, axis=-1)
        else:
            z = gumbel_softmax(gumbel_rng, logits, temperature)
        return logits, self.decoder(z)


# ----------------------------------------------------------------------------- objective
def gumbel_softmax(rng: Array, logits: Array, temperature: float | Array) -> Array:
    """Relaxed one-hot sample ``softmax((logits + g) / tau)``, g ~ Gumbel(0, 1) (no
    straight-through). ``logits: ... vocab`` -> same shape, f32."""
    g = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax((logits.astype(jnp.float32) + g) / temperature, axis=-1)


def kl_to_uniform(logits: Array) -> Array:
    """``KL(softmax(logits) || uniform) = sum_k q_k log q_k + log K`` per position (nats).
    ``logits: ... vocab`` -> ``...``."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logq) * logq, axis=-1) + math.log(logits.shape[-1])


def logit_laplace_nll(x: Array, mu: Array, log_b: Array) -> Array:
    """Per-element negative log-density of the logit-Laplace distribution (paper eq. 2).

    For ``x`` in (0, 1): ``f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``, i.e.
    a Laplace density on ``logit(x)`` carried to (0, 1) by the change of variables
    ``d logit(x)/dx = 1 / (x (1 - x))``. Hence
    ``-log f = log 2 + ln b + log x + log(1 - x) + |logit(x) - mu| / b``.
    The ``log x + log(1-x)`` Jacobian term does not depend on the model (no gradient) but is
    kept so the value is a true negative log-likelihood. ``x`` must be mapped with
    :func:`map_pixels` so ``logit(x)`` stays finite.
    """
    x = x.astype(jnp.float32)
    logx, log1mx = jnp.log(x), jnp.log1p(-x)
    return (math.log(2.0) + log_b + logx + log1mx
            + jnp.abs(logx - log1mx - mu) * jnp.exp(-log_b))


def cosine_schedule(step, start: float, end: float, steps: int) -> Array:
    """Cosine interpolation ``start -> end`` over ``steps`` then constant (jit-friendly)."""
    if steps <= 0:
        return jnp.asarray(end, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def _get(cfg, name, default):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def temperature_schedule(step, loss_config=None) -> Array:
    """Gumbel-softmax temperature: cosine 1 -> 1/16 over 150k steps (paper defaults)."""
    return cosine_schedule(step, _get(loss_config, "temperature_start", 1.0),
                           _get(loss_config, "temperature_end", 1.0 / 16),
                           _get(loss_config, "temperature_steps", 150_000))


def kl_weight_schedule(step, loss_config=None) -> Array:
    """KL weight beta: cosine 0 -> 6.6 over 5000 steps (paper defaults)."""
    return cosine_schedule(step, _get(loss_config, "kl_weight_start", 0.0),
                           _get(loss_config, "kl_weight_end", 6.6),
                           _get(loss_config, "kl_weight_steps", 5000))


def codebook_stats(tokens: Array, vocab_size: int) -> dict[str, Array]:
    """Perplexity ``exp(H(counts))`` of the code histogram and the fraction of codes used."""
    counts = jnp.zeros((vocab_size,), jnp.float32).at[tokens.reshape(-1)].add(1.0)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "codebook_usage": jnp.mean(counts > 0)}


def default_config() -> ml_collections.ConfigDict:
    """Paper-sized model + objective. ``config.model`` = :class:`DVAE` fields, ``config.loss``
    = schedule/likelihood settings read by :func:`dvae_loss`."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=8192, input_channels=3,
        n_init=128, image_size=256, logit_laplace_eps=LOGIT_LAPLACE_EPS, remat=False,
        dtype="float32", param_dtype="float32"))
    c.loss = ml_collections.ConfigDict(dict(
        temperature_start=1.0, temperature_end=1.0 / 16, temperature_steps=150_000,
        kl_weight_start=0.0, kl_weight_end=6.6, kl_weight_steps=5000))
    return c


_MODEL_FIELDS = ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "input_channels",
                 "n_init", "image_size", "logit_laplace_eps", "remat", "dtype", "param_dtype",
                 "precision")


def model_from_config(config) -> DVAE:
    """A :class:`DVAE` from ``config.model`` (a mapping of DVAE fields; dtypes may be strings),
    or ``config`` itself if it is already a DVAE (or has a DVAE as ``.model``)."""
    if isinstance(config, DVAE):
        return config
    spec = _get(config, "model", config)
    if isinstance(spec, DVAE):
        return spec
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    unknown = sorted(set(spec) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; valid keys: {list(_MODEL_FIELDS)}")
    for key in ("dtype", "param_dtype"):
        if isinstance(spec.get(key), str):
            spec[key] = jnp.dtype(spec[key])
    return DVAE(**spec)


def _batch_images(batch) -> Array:
    images = batch["image"] if isinstance(batch, Mapping) else batch
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def dvae_loss(params, batch, rng: Array, step, config) -> tuple[Array, dict[str, Array]]:
    """Negative ELBO of the dVAE at training ``step`` (pure; jit/grad friendly).

    Args:
      params: the DVAE variables (``{'params': ...}``, boxed or plain).
      batch: ``{'image': b h w c}`` (float in [0, 1] or uint8) or the image array itself.
      rng: PRNG key for the Gumbel noise.
      step: int (python or traced) driving the temperature and KL-weight schedules.
      config: ``config.model`` (DVAE fields) and ``config.loss`` (schedules), see
        :func:`default_config`.

    Returns:
      ``(loss, metrics)``. ``loss = mean_b[ NLL_sum + beta * KL_sum ] / (h w c)``: both terms
      summed per image as in the ELBO, then divided by the number of pixel dimensions so the
      scale (nats/dim) is independent of resolution while beta keeps the paper's meaning.
      metrics: ``loss``, ``recon_nll`` (nats/dim), ``kl`` (nats per latent position),
      ``elbo_bpd`` (bits/dim of the beta=1 bound), ``mse`` and ``psnr`` (dB) of
      ``unmap(sigmoid(mu))`` vs the input, ``temperature``, ``beta`` (KL weight), ``perplexity`` and
      ``codebook_usage`` of the argmax codes in the batch.

    ``config`` is static: close over it, e.g.
    ``jax.jit(lambda p, b, r, s: dvae_loss(p, b, r, s, config))``.
    """
    model = model_from_config(config)
    loss_cfg = _get(config, "loss", None)
    eps = model.logit_laplace_eps
    images = _batch_images(batch)
    temperature = temperature_schedule(step, loss_cfg)
    beta = kl_weight_schedule(step, loss_cfg)

    logits, stats = model.apply(params, images, temperature, rng)
    c = model.input_channels
    mu, log_b = stats[..., :c], stats[..., c:]
    x = map_pixels(images, eps)
    nll = jnp.sum(logit_laplace_nll(x, mu, log_b), axis=(1, 2, 3))        # b
    kl = jnp.sum(kl_to_uniform(logits), axis=(1, 2))                          # b
    dims = math.prod(images.shape[1:])
    loss = jnp.mean(nll + beta * kl) / dims

    recon = unmap_pixels(jax.nn.sigmoid(mu), eps)
    mse = jnp.mean(jnp.square(recon - images))
    tokens = jnp.argmax(logits, axis=-1)
    metrics = {
        "loss": loss,
        "recon_nll": jnp.mean(nll) / dims,
        "kl": jnp.mean(kl) / math.prod(logits.shape[1:3]),
        "elbo_bpd": jnp.mean(nll + kl) / (dims * math.log(2.0)),
        "mse": mse,
        "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
        "temperature": temperature,
        "beta": beta,
        **codebook_stats(jax.lax.stop_gradient(tokens), model.vocab_size),
    }
    return loss, metrics


def forward_flops(model: DVAE, image_size: int | None = None) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one image through the encoder and the decoder.

    Counts the convolutions only (elementwise ops are negligible), densely (zero padding
    included, the usual MFU convention); the decoder's input conv is counted as the dense 1x1
    conv of a ``vocab``-channel code, as in training.
    """
    size = image_size or model.image_size
    g, nb, h = model.group_count, model.n_blk_per_group, model.n_hid

    def block(side, c_in, c_out, kernels):
        hid = c_out // 4
        widths = [(c_in, hid), (hid, hid), (hid, hid), (hid, c_out)]
        f = sum(2 * side * side * k * k * a * b for (a, b), k in zip(widths, kernels))
        return f + (2 * side * side * c_in * c_out if c_in != c_out else 0)

    enc, side, c = 2 * size * size * 49 * model.input_channels * h, size, h
    for i in range(g):
        for _ in range(nb):
            enc += block(side, c, h * 2 ** i, (3, 3, 3, 1))
            c = h * 2 ** i
        side = side // 2 if i < g - 1 else side
    enc += 2 * side * side * c * model.vocab_size
    dec, c = 2 * side * side * model.vocab_size * model.n_init, model.n_init
    for i in range(g):
        for _ in range(nb):
            dec += block(side, c, h * 2 ** (g - 1 - i), (1, 3, 3, 3))
            c = h * 2 ** (g - 1 - i)
        side = side * 2 if i < g - 1 else side
    dec += 2 * side * side * c * 2 * model.input_channels
    return {"encoder": int(enc), "decoder": int(dec), "total": int(enc + dec)}


@functools.partial(jax.jit, static_argnums=0)
def _recon_batch(model: DVAE, params, images):
    tokens = model.apply(params, images, method=DVAE.encode)
    recon = model.apply(params, tokens, method=DVAE.decode)
    return jnp.sum(jnp.square(recon - images), axis=(1, 2, 3)), tokens


def reconstruction_metrics(model: DVAE, params, images, batch_size: int = 32) -> dict[str, float]:
    """Hard (argmax) reconstruction quality over a set of images.

    ``images: n h w c`` (float in [0, 1] or uint8). Returns ``mse`` (mean over all pixels),
    ``psnr`` (dB, from that mse), ``codebook_usage`` (fraction of the vocabulary used over
    the whole set), ``perplexity`` (of the set's code histogram) and ``num_images``. Runs in
    fixed-size jitted batches (the last one padded), so it compiles once.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"reconstruction_metrics: expected a non-empty n h w c array, got {images.shape}")
    n = len(images)
    bs = min(batch_size, n)
    sq_err, counts = 0.0, np.zeros(model.vocab_size, np.int64)
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        valid = len(chunk)
        if valid < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - valid,) + chunk.shape[1:], chunk.dtype)])
        err, tokens = _recon_batch(model, params, jnp.asarray(chunk))
        sq_err += float(np.sum(np.asarray(err)[:valid]))
        counts += np.bincount(np.asarray(tokens)[:valid].reshape(-1), minlength=model.vocab_size)
    mse = sq_err / images.size
    p = counts[counts > 0] / counts.sum()
    return {
        "mse": mse,
        "psnr": float(-10.0 * np.log10(max(mse, 1e-10))),
        "codebook_usage": float(np.mean(counts > 0)),
        "perplexity": float(np.exp(-np.sum(p * np.log(p)))),
        "num_images": n,
    }
