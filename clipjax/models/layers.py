"""Transformer building blocks shared by the CLIP towers and the DALL-E transformer.

Everything here is a pure ``flax.linen`` module: ``init`` / ``apply`` only, no I/O.
Every module has ``dtype`` (compute dtype) and ``param_dtype`` fields; LayerNorm and the
attention softmax always run in float32. Every parameter carries logical axis names
(``nn.with_logical_partitioning``), so ``init`` returns ``nn.Partitioned`` boxes; call
``nn.meta.unbox`` (or ``flax.linen.unbox``) to get plain arrays.

Public API (stable; dallejax builds on it)
------------------------------------------
``LayerNorm(epsilon=1e-5, dtype, param_dtype)``
    f32 LayerNorm, params ``scale``/``bias`` ('embed',); output cast back to ``dtype``.

``Attention(num_heads, head_dim=None, dtype, param_dtype, decode=False, precision=None)``
    ``__call__(x: b l d, mask: bool broadcastable to b h q k | None) -> b l d``.
    Params: ``qkv/kernel`` d 3 h k ('embed', None, 'heads', 'kv'), ``qkv/bias`` 3 h k,
    ``out/kernel`` h k d ('heads', 'kv', 'embed'), ``out/bias`` d.  ``mask`` True = attend.
    With ``decode=True`` the module keeps a ``'cache'`` collection
    (``cached_key``/``cached_value``: b max_len h k, ``cache_index``: int32 scalar). Create it
    with ``model.init(rng, full_length_dummy)['cache']`` (the dummy's length is max_len; the
    init call itself does not advance the cache). Each ``apply(..., mutable=['cache'])`` call then
    takes the next ``q`` tokens (``x: b q d``), writes their keys/values at ``cache_index`` and
    attends to the whole cache. The caller passes the mask rows for the current positions,
    shape ``(b|1, 1, q, max_len)``; independently, keys at positions after the current query
    position (not yet written) are always masked out, so ``mask=None`` means plain causal
    decoding.

``MLP(hidden_dim, activation='gelu'|'quick_gelu', dtype, param_dtype)``
    Params ``fc`` (embed, mlp) and ``proj`` (mlp, embed). ``gelu`` is exact (erf), matching
    ``torch.nn.GELU()``; ``quick_gelu`` is ``x * sigmoid(1.702 x)``.

``ResidualBlock(num_heads, mlp_dim, activation, decode, dtype, param_dtype)``
    Pre-LN block: ``x + attn(ln_1(x), mask)`` then ``x + mlp(ln_2(x))``.

``Transformer(num_layers, width, num_heads, mlp_ratio=4.0, mlp_dim=None, activation,
scan=False, remat_policy='none', decode=False, layer_types=None, dtype, param_dtype)``
    ``__call__(x: b l d, mask=None, layer_masks=None) -> b l d``.
    ``mask`` (bool, broadcastable to b h q k) is shared by all layers. Alternatively (or in
    addition: they are AND-ed) ``layer_masks: n_types q k`` (bool) plus the static field
    ``layer_types`` (tuple of ``num_layers`` ints in ``[0, n_types)``) give layer ``i`` the mask
    ``layer_masks[layer_types[i]]``. Works with ``scan=True`` (the type index is scanned as
    ``xs`` and the mask gathered inside the scanned body) and with ``decode=True`` (then pass
    the rows for the current positions, ``n_types q max_len``).
    Parameters: unscanned -> submodules ``layers_0 .. layers_{n-1}``; scanned -> one submodule
    ``layers`` whose params have a leading 'layers' axis. Convert with :func:`stack_layers` /
    :func:`unstack_layers` (work on params, batch_stats or cache trees, boxed or plain).
    ``remat_policy``: 'none' (no rematerialisation), 'full' (save nothing), or the name of any
    ``jax.checkpoint_policies`` member, e.g. 'dots_saveable',
    'dots_with_no_batch_dims_saveable', 'nothing_saveable'.

Helpers: ``quick_gelu``, ``gelu``, ``ACTIVATIONS``, ``make_causal_mask(length)``,
``stack_layers(tree)``, ``unstack_layers(tree)``, ``remat_policy(name)``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

Dtype = Any
Array = jax.Array

__all__ = [
    "ACTIVATIONS", "Attention", "LayerNorm", "MLP", "ResidualBlock", "Transformer",
    "gelu", "quick_gelu", "make_causal_mask", "remat_policy", "stack_layers", "unstack_layers",
]


# ----------------------------------------------------------------------------- activations
def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's GELU approximation: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, identical to ``torch.nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"gelu": gelu, "quick_gelu": quick_gelu}


def _activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def make_causal_mask(length: int) -> Array:
    """Lower-triangular attention mask, ``1 1 q k`` bool (True = may attend)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def _logical(init, axes):
    return nn.with_logical_partitioning(init, axes)


# ----------------------------------------------------------------------------- LayerNorm
class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (params ``scale``, ``bias``: ('embed',)).

    ``x: ... d -> ... d`` in ``dtype``.
    """
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", _logical(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", _logical(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------- attention
class _Weights(nn.Module):
    """A kernel (+ optional bias) with logical axes; the math is done by the caller."""
    kernel_shape: tuple
    kernel_axes: tuple
    bias_shape: Optional[tuple]
    bias_axes: Optional[tuple]
    kernel_init: Callable
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", _logical(self.kernel_init, self.kernel_axes),
                            self.kernel_shape, self.param_dtype)
        bias = None
        if self.bias_shape is not None:
            bias = self.param("bias", _logical(nn.initializers.zeros, self.bias_axes),
                              self.bias_shape, self.param_dtype)
        return kernel, bias


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (see module docstring).

    ``x: b l d``, ``mask``: bool broadcastable to ``b h q k`` (True = attend) or None.
    """
    num_heads: int
    head_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False
    use_bias: bool = True
    precision: Any = None
    qkv_init: Callable = nn.initializers.xavier_uniform(in_axis=0, out_axis=(-3, -2, -1))
    out_init: Callable = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=-1)

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        if x.ndim != 3:
            raise ValueError(f"Attention expects x of shape (batch, length, embed), got {x.shape}.")
        b, q_len, d = x.shape
        h = self.num_heads
        if self.head_dim is None and d % h:
            raise ValueError(f"Embedding width {d} is not divisible by num_heads={h}; "
                             "choose a width that is a multiple of the head count.")
        k_dim = self.head_dim or d // h

        w_qkv, b_qkv = _Weights(
            (d, 3, h, k_dim), ("embed", None, "heads", "kv"),
            (3, h, k_dim) if self.use_bias else None, (None, "heads", "kv"),
            self.qkv_init, self.param_dtype, name="qkv")()
        x = x.astype(self.dtype)
        # Output in the matmul's natural layout (b l 3 h k): producing t-major would add a
        # transpose of the whole activation (measured ~10% of a ViT-B-32 block on CPU).
        qkv = jnp.einsum("bld,dthk->blthk", x, w_qkv.astype(self.dtype), precision=self.precision)
        if b_qkv is not None:
            qkv = qkv + b_qkv.astype(self.dtype)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        valid = None
        if self.decode:
            is_initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if is_initialized:
                cache_b, max_len = cached_key.value.shape[:2]
                if cache_b != b:
                    raise ValueError(f"Decode batch {b} does not match the cache batch {cache_b}; "
                                     "re-initialise the cache with a dummy of this batch size.")
                idx = cache_index.value
                key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                                   (0, idx, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value,
                                                     value.astype(cached_value.value.dtype), (0, idx, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = idx + q_len
                # Keys not yet written (after the current query position) are never visible.
                q_pos = idx + jnp.arange(q_len)
                valid = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]

        logits = jnp.einsum("bqhk,bshk->bhqs", query, key, precision=self.precision,
                            preferred_element_type=jnp.float32)
        logits = logits * (k_dim ** -0.5)
        if mask is not None:
            valid = mask if valid is None else jnp.logical_and(mask, valid)
        if valid is not None:
            logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqs,bshk->bqhk", probs, value.astype(self.dtype), precision=self.precision)

        w_out, b_out = _Weights(
            (h, k_dim, d), ("heads", "kv", "embed"), (d,) if self.use_bias else None, ("embed",),
            self.out_init, self.param_dtype, name="out")()
        y = jnp.einsum("bqhk,hkd->bqd", out, w_out.astype(self.dtype), precision=self.precision)
        if b_out is not None:
            y = y + b_out.astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- MLP / block
class MLP(nn.Module):
    """``fc`` (embed -> mlp), activation, ``proj`` (mlp -> embed). ``x: ... d -> ... d``."""
    hidden_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = _activation(self.activation)
        d = x.shape[-1]
        y = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision,
                     kernel_init=_logical(self.kernel_init, ("embed", "mlp")),
                     bias_init=_logical(nn.initializers.zeros, ("mlp",)), name="fc")(x)
        y = act(y)
        return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                        kernel_init=_logical(self.kernel_init, ("mlp", "embed")),
                        bias_init=_logical(nn.initializers.zeros, ("embed",)), name="proj")(y)


class ResidualBlock(nn.Module):
    """Pre-LN transformer block (``ln_1``, ``attn``, ``ln_2``, ``mlp``). ``x: b l d -> b l d``."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        y = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_1")(x)
        y = Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                      decode=self.decode, precision=self.precision, name="attn")(y, mask)
        x = x + y
        y = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln_2")(x)
        y = MLP(self.mlp_dim, self.activation, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, name="mlp")(y)
        return x + y


# ----------------------------------------------------------------------------- Transformer
def remat_policy(name: str):
    """Map a config string to a ``jax.checkpoint`` policy (None = save nothing)."""
    if name in ("full", "nothing_saveable"):
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        known = ["none", "full"] + [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
        raise ValueError(f"Unknown remat_policy {name!r}; use one of {known}.")
    if name in ("save_only_these_names", "save_any_names_but_these", "save_and_offload_only_these_names",
                "save_from_both_policies"):
        raise ValueError(f"remat_policy {name!r} needs arguments; pick a fixed policy such as "
                         "'dots_saveable'.")
    return policy


def _combine_masks(mask, layer_masks, layer_type):
    if layer_masks is None:
        return mask
    m = jnp.take(layer_masks, layer_type, axis=0)[None, None]  # 1 1 q k
    return m if mask is None else jnp.logical_and(mask, m)


class _LayerStep(ResidualBlock):
    """A block called as ``(x, mask, layer_masks, layer_type)``: the unit that is remat-ed and scanned.

    Subclassing keeps the parameter tree flat (``layers_i/ln_1/...``, no extra scope).
    """
    scanned: bool = False

    def __call__(self, x, mask, layer_masks, layer_type):  # pylint: disable=arguments-renamed
        x = super().__call__(x, _combine_masks(mask, layer_masks, layer_type))
        return (x, None) if self.scanned else x


class Transformer(nn.Module):
    """A stack of pre-LN residual blocks (see module docstring). ``x: b l d -> b l d``."""
    num_layers: int
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    mlp_dim: Optional[int] = None
    activation: str = "gelu"
    scan: bool = False
    remat_policy: str = "none"
    decode: bool = False
    layer_types: Optional[Sequence[int]] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None,
                 layer_masks: Optional[Array] = None) -> Array:
        if x.ndim != 3 or x.shape[-1] != self.width:
            raise ValueError(f"Transformer(width={self.width}) expects x: b l {self.width}, got {x.shape}.")
        mlp_dim = self.mlp_dim or int(self.width * self.mlp_ratio)
        if layer_masks is not None:
            if self.layer_types is None:
                raise ValueError("layer_masks was given but Transformer.layer_types is None; set "
                                 "layer_types to a tuple of num_layers mask indices.")
            if layer_masks.ndim != 3:
                raise ValueError(f"layer_masks must be (n_types, q, k), got shape {layer_masks.shape}.")
        types = tuple(self.layer_types) if self.layer_types is not None else (0,) * self.num_layers
        if len(types) != self.num_layers:
            raise ValueError(f"layer_types has {len(types)} entries but num_layers={self.num_layers}.")
        if layer_masks is not None and (min(types) < 0 or max(types) >= layer_masks.shape[0]):
            raise ValueError(f"layer_types values must lie in [0, {layer_masks.shape[0]}) "
                             f"(layer_masks has {layer_masks.shape[0]} masks); got {types}.")
        if layer_masks is not None:
            layer_masks = layer_masks.astype(bool)
        if mask is not None:
            mask = mask.astype(bool)

        step = _LayerStep
        if self.remat_policy != "none":
            step = nn.remat(step, policy=remat_policy(self.remat_policy), prevent_cse=not self.scan)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=mlp_dim, activation=self.activation,
                      decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision)
        if self.scan:
            scanned = nn.scan(
                step, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0), length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(scanned=True, name="layers", **kwargs)(
                x, mask, layer_masks, jnp.asarray(types, jnp.int32))
        else:
            for i, t in enumerate(types):
                x = step(name=f"layers_{i}", **kwargs)(x, mask, layer_masks, t)
        return x


# ----------------------------------------------------------------------------- param restacking
_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def _stack_leaves(leaves):
    first = leaves[0]
    if isinstance(first, meta.AxisMetadata):
        stacked = jnp.stack([leaf.unbox() for leaf in leaves])
        return first.replace_boxed(stacked).add_axis(0, {nn.PARTITION_NAME: "layers"}) \
            if hasattr(first, "add_axis") else first.replace_boxed(stacked)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    return np.stack(leaves) if isinstance(first, np.ndarray) else jnp.stack(leaves)


def stack_layers(tree):
    """Unscanned -> scanned layout: ``{layers_0: t0, ..., layers_{n-1}}`` -> ``{layers: stack}``.

    Applied recursively to any nested dict (params, batch_stats, cache); other keys are kept.
    """
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    tree = dict(tree)
    idx = sorted(int(m.group(1)) for k in tree if (m := _LAYER_KEY.match(k)))
    out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_KEY.match(k)}
    if idx:
        if idx != list(range(len(idx))):
            raise ValueError(f"stack_layers: layer keys are not contiguous from 0: {idx}.")
        if "layers" in out:
            raise ValueError("stack_layers: tree has both 'layers' and 'layers_i' keys.")
        subtrees = [stack_layers(tree[f"layers_{i}"]) for i in idx]
        out["layers"] = jax.tree_util.tree_map(
            lambda *ls: _stack_leaves(ls), *subtrees,
            is_leaf=lambda v: isinstance(v, meta.AxisMetadata))
    return out


def _unstack_leaf(leaf, i):
    if isinstance(leaf, meta.AxisMetadata):
        value = leaf.unbox()[i]
        if hasattr(leaf, "remove_axis"):
            return leaf.remove_axis(0, {nn.PARTITION_NAME: "layers"}).replace_boxed(value)
        return leaf.replace_boxed(value)
    if isinstance(leaf, jax.ShapeDtypeStruct):  # shapes from jax.eval_shape
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]


def unstack_layers(tree):
    """Scanned -> unscanned layout: ``{layers: stack}`` -> ``{layers_0, ..., layers_{n-1}}``.

    The layer count is the leading dimension of the stacked leaves.
    """
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    out = {k: unstack_layers(v) for k, v in dict(tree).items() if k != "layers"}
    if "layers" in tree:
        stacked = tree["layers"]
        leaves = jax.tree_util.tree_leaves(stacked, is_leaf=lambda v: isinstance(v, meta.AxisMetadata))
        if not leaves:
            raise ValueError("unstack_layers: 'layers' subtree is empty.")
        first = leaves[0].unbox() if isinstance(leaves[0], meta.AxisMetadata) else leaves[0]
        n = first.shape[0]
        for i in range(n):
            out[f"layers_{i}"] = unstack_layers(jax.tree_util.tree_map(
                lambda leaf: _unstack_leaf(leaf, i), stacked,
                is_leaf=lambda v: isinstance(v, meta.AxisMetadata)))
    return out
