"""The configuration keys every trainer shares, their defaults, and their validation.

A config file (``configs/**.py``) returns an ``ml_collections.ConfigDict`` from ``get_config()``.
It starts from :func:`base_config` and sets what its task needs (``model``, ``data``, ...).
:func:`validate` runs once at start-up, before anything is compiled, so a wrong key fails in a
second with one line naming the key, never minutes later inside XLA.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key and how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults for the keys the shared substrate reads."""
    c = ml_collections.ConfigDict()
    c.task = ""                    # "module:factory" returning a clipjax.task.Task
    c.seed = 0
    c.batch_size = 32              # global batch, summed over all devices and processes
    c.total_steps = 100
    c.grad_accum_steps = 1         # microbatches per optimizer step

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES  # logical axis -> mesh axes (one table for every model)

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        # parameter path substrings excluded from weight decay (gains, biases, embeddings, temperature)
        wd_exclude=("bias", "scale", "embedding", "logit_scale", "logit_bias", "class_token",
                    "positional", "ln_", "norm"),
        schedule="cosine",          # cosine | linear | constant
        warmup_steps=0, end_lr_ratio=0.0, grad_clip_norm=0.0, ema_decay=0.0,
        decay_steps=0,              # steps of decay after warmup, then constant; 0 = until the end
        freeze=(),                  # parameter path prefixes kept frozen (e.g. ("visual",) for LiT)
    ))
    c.train = ml_collections.ConfigDict(dict(
        log_every=10, eval_every=0, progress_bar=True,
        nonfinite="skip",           # skip: drop the update and count it; error: stop, naming the step
        peak_flops_per_device=0.0,  # 0 = look the device up in clipjax.metrics.PEAK_FLOPS
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=100, keep=3, async_save=True, save_at_end=True))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False,           # or set CLIPJAX_DISTRIBUTED=1; True auto-detects TPU pods / SLURM
        coordinator_address="", num_processes=0, process_id=-1))
    return c


# One table for CLIP towers, dVAE and the DALL-E transformer. A mesh axis of size 1 makes its
# rules no-ops, so data parallel, FSDP and FSDP+TP are just mesh shapes over the same table.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("height", None),
    ("width", None),
)

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Sizes for ('data', 'fsdp', 'tensor'); one axis may be -1 to take the remaining devices."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError("config.mesh: only one of data/fsdp/tensor may be -1 (fill); got "
                          f"{dict(zip(MESH_AXES, sizes))}")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"config.mesh.{a}={s}: sizes must be positive or -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh: {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} "
                f"devices; set config.mesh.* so that their product divides {num_devices}")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"config.mesh: data*fsdp*tensor = {known} but there are {num_devices} devices; set "
            f"config.mesh.data=-1 to fill, or make the product equal {num_devices}")
    return tuple(sizes)


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Checks the shared keys. Raises ConfigError naming the key and the fix."""
    if not config.get("task"):
        raise ConfigError("config.task is empty: set it to 'module:factory' (e.g. 'clipjax.train:clip_task')")
    if ":" not in config.task:
        raise ConfigError(f"config.task={config.task!r}: expected 'module:factory'")
    for key in ("batch_size", "total_steps", "grad_accum_steps"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key}={config[key]}: must be >= 1")
    data, fsdp, tensor = resolve_mesh_shape(config.mesh, num_devices)
    batch_shards = data * fsdp
    accum = int(config.grad_accum_steps)
    if config.batch_size % accum:
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by "
                          f"config.grad_accum_steps={accum}")
    micro = config.batch_size // accum
    if micro % batch_shards:
        raise ConfigError(
            f"config.batch_size={config.batch_size} (microbatch {micro}) is not divisible by the "
            f"batch-sharded mesh axes data*fsdp={batch_shards}; use a multiple of {batch_shards}")
    if config.batch_size % num_processes:
        raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                          f"{num_processes} processes")
    if config.train.nonfinite not in ("skip", "error"):
        raise ConfigError(f"config.train.nonfinite={config.train.nonfinite!r}: use 'skip' or 'error'")
    if config.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"config.optim.schedule={config.optim.schedule!r}: use cosine, linear or constant")
    if config.optim.name not in ("adamw", "sgd", "lamb"):
        raise ConfigError(f"config.optim.name={config.optim.name!r}: use adamw, sgd or lamb")
    if config.optim.warmup_steps > config.total_steps:
        raise ConfigError(f"config.optim.warmup_steps={config.optim.warmup_steps} exceeds "
                          f"config.total_steps={config.total_steps}")
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ConfigError(f"config.optim.ema_decay={config.optim.ema_decay}: must be in [0, 1)")
    known_axes = set(MESH_AXES)
    for rule in config.sharding.rules:
        if len(rule) != 2:
            raise ConfigError(f"config.sharding.rules: {rule!r} is not a (logical, mesh) pair")
        targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for t in targets:
            if t is not None and t not in known_axes:
                raise ConfigError(f"config.sharding.rules: {rule[0]!r} maps to unknown mesh axis {t!r}; "
                                  f"mesh axes are {MESH_AXES}")
