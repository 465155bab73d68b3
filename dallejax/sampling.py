"""Autoregressive image-token sampling for :class:`dallejax.transformer.DalleTransformer`.

:func:`sample` is one jitted function: the caption is written into the KV cache in one call
(:meth:`DalleTransformer.prefill`), then ``lax.fori_loop`` feeds one image token per step
(:meth:`DalleTransformer.decode_step`), each step passing every layer its sparse-mask row for the
current position. :func:`sample_uncached` is the reference: the same loop, but every step
recomputes the whole teacher-forced forward pass (no cache). Both use the same key schedule
(step ``k`` draws with ``jax.random.split(rng, N)[k]``), so with the same seed they produce the
same tokens (up to float rounding on exact ties).

Options:
  * ``temperature`` (0 = greedy argmax), ``top_k`` (0 = off), ``top_p`` (1 = off); applied in
    that order: logits / temperature, keep the ``top_k`` largest, keep the smallest set of
    most-likely tokens whose probability reaches ``top_p``.
  * ``guidance_scale`` (classifier-free guidance): the caption and an unconditional caption
    (``null_text``; default the empty caption ``[SOT, EOT, pad...]``) run as one batch of ``2b``;
    the logits used are ``uncond + s * (cond - uncond)``; ``s = 1`` is plain conditional sampling
    and does not run the unconditional half.
  * ``num_samples`` per caption: rows ``i * num_samples + j`` are sample ``j`` of caption ``i``.
  * Completion / editing: ``fixed_tokens: b N`` (or ``b*num_samples N``) with ``fixed_mask: N`` or
    ``b N`` (True = keep). At step ``k`` a kept position is *teacher-forced* (the given token is
    fed instead of the sample; the step's key is still consumed so the schedule does not shift)
    and a masked position is sampled. For completion keep the first ``R`` rows
    (:func:`completion_mask`). For editing keep everything outside a box (:func:`box_mask`):
    sampling is in raster order, so a resampled token is conditioned on the caption and on
    everything *before* it in raster order (the rows above the box, the row-prefix to its left,
    and its own earlier samples) but not on the kept tokens after it (to its right on the same
    row, or below the box). The kept tokens after the box are then fed as given, so they are
    consistent inputs for what follows but may not match the new box content. The paper's
    completions resample a region that extends to the bottom-right corner, where this caveat
    vanishes.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dallejax.transformer import DalleConfig, DalleTransformer

Array = jax.Array

__all__ = ["init_cache", "filter_logits", "sample_logits", "empty_caption", "completion_mask", "box_mask",
           "sample", "sample_uncached"]


# ----------------------------------------------------------------------------- helpers
def init_cache(model: DalleTransformer, batch: int) -> Any:
    """A zero ``'cache'`` collection for ``batch`` rows (shapes from ``jax.eval_shape``; no params made)."""
    dec = model if model.decode else model.clone(decode=True)
    cfg = model.config
    text = jax.ShapeDtypeStruct((batch, cfg.text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((batch, cfg.image_len), jnp.int32)
    shapes = jax.eval_shape(lambda t, i: dec.init(jax.random.PRNGKey(0), t, i)["cache"], text, image)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def filter_logits(logits: Array, top_k: int = 0, top_p: float | Array = 1.0) -> Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. ``logits: b v`` (float32)."""
    neg = jnp.finfo(jnp.float32).min
    logits = logits.astype(jnp.float32)
    if top_k:
        if not 0 < top_k:
            raise ValueError(f"top_k must be >= 0, got {top_k}.")
        kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    top_p = jnp.asarray(top_p, jnp.float32)
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs           # mass strictly above each sorted token
    keep = (before < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, neg, logits)


def sample_logits(key: Array, logits: Array, temperature: float | Array = 1.0, top_k: int = 0,
                  top_p: float | Array = 1.0) -> Array:
    """One token per row of ``logits: b v`` -> ``b`` int32. ``temperature <= 0`` is greedy."""
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    drawn = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(temperature <= 0, greedy, drawn).astype(jnp.int32)


def empty_caption(config: DalleConfig, batch: int = 1, sot_id: Optional[int] = None) -> np.ndarray:
    """The unconditional caption ``[SOT, EOT, 0, ...]`` (``b T`` int32). ``sot_id`` defaults to
    ``eot - 1`` (CLIP: 49406 / 49407)."""
    eot = config.end_of_text
    sot = eot - 1 if sot_id is None else sot_id
    text = np.zeros((batch, config.text_len), np.int32)
    text[:, 0], text[:, 1] = sot, eot
    return text


def completion_mask(grid: int, keep_rows: int) -> np.ndarray:
    """``N`` bool: True for the first ``keep_rows`` rows of a ``grid x grid`` token image."""
    if not 0 <= keep_rows <= grid:
        raise ValueError(f"keep_rows must lie in [0, {grid}] (the token grid height), got {keep_rows}.")
    mask = np.zeros((grid, grid), bool)
    mask[:keep_rows] = True
    return mask.reshape(-1)


def box_mask(grid: int, box: Sequence[int]) -> np.ndarray:
    """``N`` bool: False inside the token box ``(x0, y0, x1, y1)`` (half-open, columns x, rows y), True
    outside (kept)."""
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}.")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= grid and 0 <= y0 < y1 <= grid):
        raise ValueError(f"box {box!r} must satisfy 0 <= x0 < x1 <= {grid} and 0 <= y0 < y1 <= {grid} "
                         "(token-grid units).")
    mask = np.ones((grid, grid), bool)
    mask[y0:y1, x0:x1] = False
    return mask.reshape(-1)


# ----------------------------------------------------------------------------- input preparation
def _per_row(x, rows: int, num_samples: int, width: int, what: str, dtype):
    """``x``: one row, one per caption or one per sample (``width`` wide) -> ``rows width``."""
    x = jnp.asarray(x, dtype)
    if x.size % width or x.ndim == 0:
        raise ValueError(f"{what} must have {width} entries per row, got shape {np.shape(x)}.")
    x = x.reshape(-1, width)
    if x.shape[0] == 1:
        return jnp.broadcast_to(x, (rows, width))
    if x.shape[0] * num_samples == rows:
        return jnp.repeat(x, num_samples, axis=0)
    if x.shape[0] == rows:
        return x
    raise ValueError(f"{what} has {x.shape[0]} rows; expected 1, one per caption ({rows // num_samples}) "
                     f"or one per sample ({rows}).")


def _prepare(model, text, num_samples, guidance_scale, null_text, fixed_tokens, fixed_mask):
    cfg = model.config
    text = jnp.asarray(text)
    if text.ndim == 1:
        text = text[None]
    if text.ndim != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"text must be (batch, {cfg.text_len}) token ids, got shape {text.shape}; tokenize "
                         f"with context_length={cfg.text_len}.")
    if not jnp.issubdtype(text.dtype, jnp.integer):
        raise ValueError(f"text must hold integer token ids, got dtype {text.dtype}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    text = jnp.repeat(text.astype(jnp.int32), num_samples, axis=0)
    rows, n = text.shape[0], cfg.image_len
    guided = guidance_scale is not None and float(guidance_scale) != 1.0
    if guided:
        null = empty_caption(cfg) if null_text is None else null_text
        text = jnp.concatenate([text, _per_row(null, rows, num_samples, cfg.text_len, "null_text", jnp.int32)])
    if (fixed_tokens is None) != (fixed_mask is None):
        raise ValueError("fixed_tokens and fixed_mask go together: pass both (completion / editing) or neither.")
    if fixed_tokens is None:
        return text, guided, jnp.zeros((rows, n), jnp.int32), jnp.zeros((rows, n), bool)
    fixed = _per_row(fixed_tokens, rows, num_samples, n, "fixed_tokens", jnp.int32)
    keep = _per_row(fixed_mask, rows, num_samples, n, "fixed_mask", bool)
    return text, guided, fixed, keep


def _choose(key, logits, rows, guided, guidance_scale, temperature, top_k, top_p, fixed, keep):
    """Token for one step from the (possibly 2x batch) logits; fixed positions are teacher-forced."""
    if guided:
        cond, uncond = logits[:rows], logits[rows:]
        logits = uncond + guidance_scale * (cond - uncond)
    tok = sample_logits(key, logits, temperature, top_k, top_p)
    tok = jnp.where(keep, fixed, tok)
    return tok, (jnp.concatenate([tok, tok]) if guided else tok)


# ----------------------------------------------------------------------------- samplers
@functools.partial(jax.jit, static_argnames=("model", "top_k", "guided"))
def _sample_cached(model, params, text, rng, temperature, top_k, top_p, guided, guidance_scale, fixed, keep):
    rows, n = fixed.shape
    dec = model.clone(decode=True)
    keys = jax.random.split(rng, n)
    cache = init_cache(dec, text.shape[0])
    logits, state = dec.apply({"params": params, "cache": cache}, text, method=DalleTransformer.prefill,
                              mutable=["cache"])
    choose = functools.partial(_choose, rows=rows, guided=guided, guidance_scale=guidance_scale,
                               temperature=temperature, top_k=top_k, top_p=top_p)

    def body(k, carry):
        cache, logits, tokens = carry
        tok, fed = choose(keys[k], logits, fixed=fixed[:, k], keep=keep[:, k])
        tokens = tokens.at[:, k].set(tok)
        logits, state = dec.apply({"params": params, "cache": cache}, fed, k,
                                  method=DalleTransformer.decode_step, mutable=["cache"])
        return state["cache"], logits, tokens

    tokens = jnp.zeros((rows, n), jnp.int32)
    _, logits, tokens = jax.lax.fori_loop(0, n - 1, body, (state["cache"], logits, tokens))
    tok, _ = choose(keys[n - 1], logits, fixed=fixed[:, n - 1], keep=keep[:, n - 1])
    return tokens.at[:, n - 1].set(tok)


@functools.partial(jax.jit, static_argnames=("model", "top_k", "guided"))
def _sample_recompute(model, params, text, rng, temperature, top_k, top_p, guided, guidance_scale, fixed, keep):
    rows, n = fixed.shape
    model = model.clone(decode=False)
    keys = jax.random.split(rng, n)
    choose = functools.partial(_choose, rows=rows, guided=guided, guidance_scale=guidance_scale,
                               temperature=temperature, top_k=top_k, top_p=top_p)

    def body(k, tokens):
        fed_tokens = jnp.concatenate([tokens, tokens]) if guided else tokens
        _, image_logits = model.apply({"params": params}, text, fed_tokens)
        logits = jax.lax.dynamic_index_in_dim(image_logits, k, axis=1, keepdims=False)
        tok, _ = choose(keys[k], logits, fixed=fixed[:, k], keep=keep[:, k])
        return tokens.at[:, k].set(tok)

    return jax.lax.fori_loop(0, n, body, jnp.zeros((rows, n), jnp.int32))


def _run(fn, model, params, text, rng, num_samples, temperature, top_k, top_p, guidance_scale, null_text,
         fixed_tokens, fixed_mask):
    if not isinstance(model, DalleTransformer):
        raise ValueError(f"model must be a DalleTransformer, got {type(model).__name__}.")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}.")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p}.")
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    text, guided, fixed, keep = _prepare(model, text, num_samples, guidance_scale, null_text, fixed_tokens,
                                         fixed_mask)
    if "params" in params and isinstance(params.get("params"), dict):
        params = params["params"]
    params = nn.meta.unbox(params)
    scale = jnp.asarray(1.0 if guidance_scale is None else guidance_scale, jnp.float32)
    return fn(model, params, text, rng, jnp.asarray(temperature, jnp.float32), int(top_k),
              jnp.asarray(top_p, jnp.float32), guided, scale, fixed, keep)


def sample(model: DalleTransformer, params: Any, text: Array, rng: Array | int, *, num_samples: int = 1,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, guidance_scale: float = 1.0,
           null_text: Optional[Array] = None, fixed_tokens: Optional[Array] = None,
           fixed_mask: Optional[Array] = None) -> Array:
    """KV-cached sampling (see module docstring).

    ``text: b T`` caption ids; ``rng``: a PRNG key or an int seed. Returns image tokens
    ``(b * num_samples) N`` int32 (reshape to ``b*num_samples grid grid`` for the dVAE).
    """
    return _run(_sample_cached, model, params, text, rng, num_samples, temperature, top_k, top_p,
                guidance_scale, null_text, fixed_tokens, fixed_mask)


def sample_uncached(model: DalleTransformer, params: Any, text: Array, rng: Array | int, *,
                    num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    guidance_scale: float = 1.0, null_text: Optional[Array] = None,
                    fixed_tokens: Optional[Array] = None, fixed_mask: Optional[Array] = None) -> Array:
    """Reference sampler: identical interface and key schedule to :func:`sample`, but every step
    recomputes the full forward pass over ``[text | image so far]`` (O(N) passes of length L)."""
    return _run(_sample_recompute, model, params, text, rng, num_samples, temperature, top_k, top_p,
                guidance_scale, null_text, fixed_tokens, fixed_mask)
