"""The DALL-E transformer: a decoder-only sparse transformer over ``[text | image]`` tokens.

Sequence layout (``T`` = ``config.text_len``, ``N = grid * grid`` image tokens)::

    tokens   = [t_0 t_1 ... t_{T-1} | i_0 i_1 ... i_{N-1}]        (length T + N)
    inputs   = tokens[:-1]                                          (length L = T + N - 1)
    position p predicts tokens[p + 1]

Position ``p`` *holds* ``tokens[p]`` (its embedding, its position embedding and its row in the
attention masks are those of the token it holds) and its logits predict the next token. ``t_0``
is the caption's start token (CLIP's ``<|startoftext|>``), so it is never predicted: the text
logits cover ``t_1 .. t_{T-1}`` (``T - 1`` positions), the image logits cover ``i_0 .. i_{N-1}``
(``N`` positions; ``i_0`` is predicted from the last text position). The last image token is
never an input, which is why ``L = T + N - 1`` and why the KV cache holds ``L`` positions.

Text padding (paper, sec. 2.2 / B.2): a caption shorter than ``T`` is padded, and every padded
position ``p`` gets its *own* learned padding token, id ``text_vocab_size + p``. Padding is
"every position after the first end-of-text token" (``config.eot_id``, default the last vocab
id as in CLIP's BPE, whose padding id 0 is also the real token ``!``). The text embedding table
and the text head therefore have ``text_vocab_size + T`` entries, and the padding tokens are
predicted like any other text token.

Embeddings: separate text and image token tables, learned text position embeddings and
broadcast row + column embeddings for the image grid. Body: pre-LN blocks from
:mod:`clipjax.models.layers` with one attention mask per layer (:mod:`dallejax.masks`; the
paper's row/column/conv schedule or dense), final LayerNorm. Two output heads, ``text_head``
(``embed -> text_vocab_size + T``) and ``image_head`` (``embed -> image_vocab_size``): each
position only ever predicts one modality, so two heads avoid computing (and masking) the other
modality's logits, and sampling only evaluates the image head. Logits are float32.

Loss (paper, sec. 2.2): ``dalle_loss = text_weight * CE_text + (1 - text_weight) * CE_image``
with ``text_weight = 1/8``, each cross-entropy averaged over its own number of tokens.

Parameters (all with logical axis names)::

    text_embedding  (text_vocab_size + T, d)   ('vocab', 'embed')
    image_embedding (image_vocab_size, d)      ('vocab', 'embed')
    text_position   (T, d)                     ('length', 'embed')
    image_row       (grid, d)                  ('height', 'embed')
    image_column    (grid, d)                  ('width', 'embed')
    transformer/... (clipjax.models.layers.Transformer)
    ln_final/{scale,bias}
    text_head/{kernel (d, V_t + T) ('embed', 'vocab'), bias}, image_head/{kernel, bias}

Decoding (``decode=True``, see :mod:`dallejax.sampling`): :meth:`DalleTransformer.prefill` writes
the caption into the ``'cache'`` collection and returns the logits of ``i_0``;
:meth:`DalleTransformer.decode_step` feeds ``i_k`` and returns the logits of ``i_{k+1}``. Each
call passes every layer the rows of its mask for the positions it writes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipjax.models.layers import LayerNorm, Transformer
from dallejax import masks as masks_lib

Array = jax.Array
Dtype = Any

__all__ = ["DalleConfig", "DalleTransformer", "model_from_config", "remap_text_padding", "token_losses",
           "dalle_loss", "count_params"]


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    """Shape of a DALL-E transformer (hashable: usable as a module field)."""
    text_vocab_size: int = 16384      # BPE vocabulary, without the per-position padding tokens
    text_len: int = 256
    image_vocab_size: int = 8192
    grid: int = 32                    # image tokens per side (N = grid ** 2)
    width: int = 3968
    num_layers: int = 64
    num_heads: int = 62
    mlp_ratio: float = 4.0
    attention: Union[str, Sequence[str]] = "dalle"   # see dallejax.masks.resolve_schedule
    conv_kernel: int = 11
    eot_id: int = -1                  # end-of-text id; -1 = text_vocab_size - 1 (CLIP's convention)
    activation: str = "gelu"

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Model input length ``T + N - 1`` (the last image token is never an input)."""
        return self.text_len + self.image_len - 1

    @property
    def text_classes(self) -> int:
        return self.text_vocab_size + self.text_len

    @property
    def end_of_text(self) -> int:
        return self.text_vocab_size - 1 if self.eot_id < 0 else self.eot_id

    def validate(self) -> "DalleConfig":
        for key in ("text_vocab_size", "text_len", "image_vocab_size", "grid", "width", "num_layers",
                    "num_heads"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"DalleConfig.{key} must be >= 1, got {getattr(self, key)}.")
        if self.text_len < 2:
            raise ValueError(f"DalleConfig.text_len={self.text_len}: need >= 2 (a start token and text).")
        if self.width % self.num_heads:
            raise ValueError(f"DalleConfig.width={self.width} is not divisible by num_heads={self.num_heads}; "
                             "set width = num_heads * head_dim.")
        if not 0 <= self.end_of_text < self.text_vocab_size:
            raise ValueError(f"DalleConfig.eot_id={self.eot_id} is outside the text vocabulary "
                             f"[0, {self.text_vocab_size}); use -1 for the last id.")
        masks_lib.resolve_schedule(self.attention, self.num_layers)
        if "conv" in masks_lib.resolve_schedule(self.attention, self.num_layers) and self.conv_kernel % 2 == 0:
            raise ValueError(f"DalleConfig.conv_kernel={self.conv_kernel} must be odd.")
        return self


@functools.lru_cache(maxsize=8)
def _layer_masks(config: DalleConfig) -> tuple[tuple[int, ...], np.ndarray]:
    attention = config.attention if isinstance(config.attention, str) else tuple(config.attention)
    types, m = masks_lib.layer_masks(attention, config.num_layers, config.text_len, config.grid, config.grid,
                                     config.conv_kernel)
    length = config.seq_len
    return types, np.ascontiguousarray(m[:, :length, :length])


def remap_text_padding(text: Array, config: DalleConfig) -> Array:
    """``text: b T`` -> ``b T`` with every position after the first end-of-text token replaced by its
    own padding id ``text_vocab_size + position``."""
    is_eot = (text == config.end_of_text).astype(jnp.int32)
    after_eot = (jnp.cumsum(is_eot, axis=1) - is_eot) > 0
    pad_ids = config.text_vocab_size + jnp.arange(text.shape[1], dtype=text.dtype)
    return jnp.where(after_eot, pad_ids[None, :], text)


def _check_ids(x, vocab: int, what: str):
    if isinstance(x, jax.core.Tracer):
        return
    xn = np.asarray(x)
    if xn.size and (xn.min() < 0 or xn.max() >= vocab):
        raise ValueError(f"{what} ids must lie in [0, {vocab}), got range [{xn.min()}, {xn.max()}]; check the "
                         "tokenizer / dVAE vocabulary against the model config.")


def _embed_init(std=0.02):
    return nn.initializers.normal(stddev=std)


class DalleTransformer(nn.Module):
    """See module docstring. ``text: b T`` (int), ``image: b N`` or ``b grid grid`` (int)."""
    config: DalleConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"
    decode: bool = False
    precision: Any = None

    def setup(self):
        cfg = self.config.validate()
        d = cfg.width
        p = lambda init, axes: nn.with_logical_partitioning(init, axes)  # noqa: E731
        self.text_embedding = self.param("text_embedding", p(_embed_init(), ("vocab", "embed")),
                                         (cfg.text_classes, d), self.param_dtype)
        self.image_embedding = self.param("image_embedding", p(_embed_init(), ("vocab", "embed")),
                                          (cfg.image_vocab_size, d), self.param_dtype)
        self.text_position = self.param("text_position", p(_embed_init(0.01), ("length", "embed")),
                                        (cfg.text_len, d), self.param_dtype)
        self.image_row = self.param("image_row", p(_embed_init(0.01), ("height", "embed")),
                                    (cfg.grid, d), self.param_dtype)
        self.image_column = self.param("image_column", p(_embed_init(0.01), ("width", "embed")),
                                       (cfg.grid, d), self.param_dtype)
        types, _ = _layer_masks(cfg)
        self.transformer = Transformer(
            num_layers=cfg.num_layers, width=d, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            activation=cfg.activation, scan=self.scan, remat_policy=self.remat_policy, decode=self.decode,
            layer_types=types, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.ln_final = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)
        head = lambda n: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            kernel_init=p(_embed_init(), ("embed", "vocab")), bias_init=p(nn.initializers.zeros, ("vocab",)))
        self.text_head = head(cfg.text_classes)
        self.image_head = head(cfg.image_vocab_size)

    # -------------------------------------------------------------------------------- pieces
    def embed_text(self, text: Array) -> Array:
        """``text: b T`` (raw BPE ids) -> ``b T d``."""
        cfg = self.config
        ids = remap_text_padding(text.astype(jnp.int32), cfg)
        x = jnp.take(self.text_embedding, ids, axis=0) + self.text_position[None, : text.shape[1]]
        return x.astype(self.dtype)

    def embed_image(self, image: Array, offset: Union[int, Array] = 0) -> Array:
        """``image: b q`` tokens at raster indices ``offset .. offset + q - 1`` -> ``b q d``."""
        g = self.config.grid
        idx = offset + jnp.arange(image.shape[1])
        pos = jnp.take(self.image_row, idx // g, axis=0) + jnp.take(self.image_column, idx % g, axis=0)
        x = jnp.take(self.image_embedding, image.astype(jnp.int32), axis=0) + pos[None]
        return x.astype(self.dtype)

    def _body(self, x: Array, start: Union[int, Array] = 0) -> Array:
        """Transformer + final LN for ``x: b q d`` at positions ``start .. start + q - 1``."""
        _, masks = _layer_masks(self.config)
        masks = jnp.asarray(masks)
        q = x.shape[1]
        if self.decode:
            # Rows of the positions written now, against all L cache slots (init: q = L, start = 0).
            rows = jax.lax.dynamic_slice_in_dim(masks, start, q, axis=1)    # n_types q L
        else:
            rows = masks[:, :q, :q]
        return self.ln_final(self.transformer(x, layer_masks=rows))

    def _logits(self, head, h: Array) -> Array:
        return head(h).astype(jnp.float32)

    def _check(self, text: Array, image: Optional[Array]):
        cfg = self.config
        if text.ndim != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be (batch, {cfg.text_len}) token ids, got shape {text.shape}; tokenize "
                             f"with context_length={cfg.text_len}.")
        if not jnp.issubdtype(text.dtype, jnp.integer):
            raise ValueError(f"text must hold integer token ids, got dtype {text.dtype}.")
        _check_ids(text, cfg.text_vocab_size, "text")
        if image is not None:
            if image.ndim == 3:
                image = image.reshape(image.shape[0], -1)
            if image.ndim != 2 or image.shape[1] != cfg.image_len or image.shape[0] != text.shape[0]:
                raise ValueError(f"image must be (batch, {cfg.image_len}) or (batch, {cfg.grid}, {cfg.grid}) "
                                 f"token ids with the text's batch {text.shape[0]}, got shape {image.shape}.")
            if not jnp.issubdtype(image.dtype, jnp.integer):
                raise ValueError(f"image must hold integer dVAE token ids, got dtype {image.dtype}.")
            _check_ids(image, cfg.image_vocab_size, "image")
        return image

    # -------------------------------------------------------------------------------- API
    def __call__(self, text: Array, image: Array) -> tuple[Array, Array]:
        """Teacher-forced forward pass.

        ``text: b T``, ``image: b N`` (or ``b grid grid``) -> ``text_logits: b (T-1) (V_t + T)`` predicting
        ``remap_text_padding(text)[:, 1:]`` and ``image_logits: b N V_i`` predicting ``image`` (float32).
        """
        image = self._check(text, image)
        x = jnp.concatenate([self.embed_text(text), self.embed_image(image[:, :-1])], axis=1)
        h = self._body(x)
        t = self.config.text_len
        return self._logits(self.text_head, h[:, : t - 1]), self._logits(self.image_head, h[:, t - 1:])

    def prefill(self, text: Array) -> Array:
        """Decode mode: write the caption ``text: b T`` into the cache; returns the logits of the first
        image token, ``b V_i``."""
        self._check(text, None)
        h = self._body(self.embed_text(text), 0)
        return self._logits(self.image_head, h[:, -1])

    def decode_step(self, token: Array, index: Union[int, Array]) -> Array:
        """Decode mode: feed image token ``index`` (``token: b``); returns the logits of image token
        ``index + 1``, ``b V_i``. ``index`` may be traced (inside ``lax.fori_loop``)."""
        x = self.embed_image(token[:, None], index)
        h = self._body(x, self.config.text_len + index)
        return self._logits(self.image_head, h[:, 0])


# ------------------------------------------------------------------------------------ factory
_MODULE_FIELDS = ("dtype", "param_dtype", "scan", "remat_policy", "decode", "precision")


def model_from_config(model_config: Any, **overrides: Any) -> DalleTransformer:
    """A :class:`DalleTransformer` from a mapping (``config.model`` of ``configs/dalle/*.py``) holding
    :class:`DalleConfig` fields plus module fields (``dtype``/``param_dtype`` may be strings)."""
    spec = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    spec.update(overrides)
    known = {f.name for f in dataclasses.fields(DalleConfig)}
    unknown = sorted(set(spec) - known - set(_MODULE_FIELDS))
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; valid keys: {sorted(known | set(_MODULE_FIELDS))}.")
    module = {k: spec.pop(k) for k in _MODULE_FIELDS if k in spec}
    for key in ("dtype", "param_dtype"):
        if isinstance(module.get(key), str):
            module[key] = jnp.dtype(module[key])
    if isinstance(spec.get("attention"), list):
        spec["attention"] = tuple(spec["attention"])
    return DalleTransformer(DalleConfig(**spec).validate(), **module)


def count_params(model: DalleTransformer) -> int:
    """Number of parameters, from ``jax.eval_shape`` (nothing is allocated)."""
    cfg = model.config
    text = jax.ShapeDtypeStruct((1, cfg.text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((1, cfg.image_len), jnp.int32)
    shapes = jax.eval_shape(lambda t, i: model.init(jax.random.PRNGKey(0), t, i)["params"], text, image)
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


# ------------------------------------------------------------------------------------ loss
def _cross_entropy(logits: Array, targets: Array) -> Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_losses(text_logits: Array, image_logits: Array, text: Array, image: Array, config: DalleConfig,
                 text_weight: float = 1.0 / 8) -> tuple[Array, dict[str, Array]]:
    """``text_weight * CE_text + (1 - text_weight) * CE_image`` from the outputs of
    :meth:`DalleTransformer.__call__`; each CE is the mean over its own tokens (``b (T-1)`` text,
    ``b N`` image). Returns ``(loss, metrics)``."""
    image = image.reshape(image.shape[0], -1)
    text_targets = remap_text_padding(text.astype(jnp.int32), config)[:, 1:]
    text_ce = _cross_entropy(text_logits, text_targets).mean()
    image_ce = _cross_entropy(image_logits, image).mean()
    loss = text_weight * text_ce + (1.0 - text_weight) * image_ce
    metrics = {"loss": loss, "text_loss": text_ce, "image_loss": image_ce,
               "image_accuracy": jnp.mean(jnp.argmax(image_logits, -1) == image)}
    return loss, metrics


def dalle_loss(params: Any, batch: Mapping[str, Array], model: DalleTransformer,
               text_weight: float = 1.0 / 8) -> tuple[Array, dict[str, Array]]:
    """Pure training objective: ``batch = {'text': b T, 'image': b N | b grid grid}`` ->
    ``(loss, metrics)`` (paper: 1/8 text + 7/8 image cross-entropy)."""
    for key in ("text", "image"):
        if key not in batch:
            raise ValueError(f"dalle_loss: batch has no {key!r} entry (keys: {sorted(batch)}); the DALL-E batch "
                             "needs 'text' (BPE ids) and 'image' (dVAE token ids).")
    text_logits, image_logits = model.apply({"params": params}, batch["text"], batch["image"])
    return token_losses(text_logits, image_logits, batch["text"], batch["image"], model.config, text_weight)
