"""The optimizer from config: clip-by-global-norm -> AdamW (masked weight decay) -> schedule.

Parameters are matched by their '/'-joined path (e.g. ``image/blocks/attn/qkv/bias``), so the
rules read like the model's own names and work for every model without per-model code.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def param_path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _tree_by_path(params: Any, fn: Callable[[str], Any]) -> Any:
    # Partitioned boxes count as leaves so the result is a prefix of boxed and unboxed trees alike.
    return jax.tree_util.tree_map_with_path(
        lambda p, _: fn(param_path(p)), params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def decay_mask(params: Any, exclude: tuple[str, ...]) -> Any:
    """True where weight decay applies: matrices/kernels, not gains, biases, embeddings, temperature."""
    return _tree_by_path(params, lambda path: not any(e in path for e in exclude))


def make_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    warmup = int(cfg.warmup_steps)
    peak, end = float(cfg.lr), float(cfg.lr) * float(cfg.end_lr_ratio)
    decay_steps = int(cfg.get("decay_steps", 0)) or max(total_steps - warmup, 1)  # then constant
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(cfg.end_lr_ratio))
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(peak, end, decay_steps)
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(cfg: Any, total_steps: int, extra_frozen: tuple = ()) -> optax.GradientTransformation:
    """Builds the optax chain described by ``config.optim``."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    mask = lambda p: decay_mask(p, tuple(cfg.wd_exclude))
    if cfg.name == "adamw":
        parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=float(cfg.weight_decay), mask=mask))
    elif cfg.name == "lamb":
        parts.append(optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                weight_decay=float(cfg.weight_decay), mask=mask))
    else:
        parts.append(optax.add_decayed_weights(float(cfg.weight_decay), mask=mask))
        parts.append(optax.sgd(schedule, momentum=cfg.b1 or None))
    tx = optax.chain(*parts)
    freeze = tuple(cfg.freeze) + tuple(extra_frozen)
    if freeze:
        labels = lambda p: _tree_by_path(
            p, lambda path: "frozen" if any(path.startswith(f) for f in freeze) else "train")
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree)


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)
