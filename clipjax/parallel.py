"""Mesh, logical-axis rules and data placement: the only place where shardings are decided.

Models name their parameter axes logically (``('embed', 'mlp')``); the config maps logical
names to mesh axes (``config.sharding.rules``); this module turns that into ``NamedSharding``s
over a ``jax.make_mesh`` mesh with axes ``('data', 'fsdp', 'tensor')``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.config import MESH_AXES, resolve_mesh_shape

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(dist_cfg: Any) -> None:
    """Calls ``jax.distributed.initialize`` only when asked (config or CLIPJAX_DISTRIBUTED=1).

    With no explicit address it auto-detects TPU pods, SLURM and other clusters, so the same
    command runs on every host. CPU runs stay single-process by default.
    """
    wanted = bool(dist_cfg.initialize) or os.environ.get("CLIPJAX_DISTRIBUTED", "") in ("1", "true")
    if not wanted or jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # Multi-process on CPU (tests, laptops): cross-process collectives need gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if dist_cfg.coordinator_address:
        kwargs = dict(coordinator_address=dist_cfg.coordinator_address,
                      num_processes=int(dist_cfg.num_processes),
                      process_id=int(dist_cfg.process_id))
    jax.distributed.initialize(**kwargs)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; sizes from the config, -1 fills with the rest."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def _fit_spec(shape: Sequence[int], spec: P, mesh: jax.sharding.Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (that dimension is replicated instead).

    A 3-channel conv input or a 10-class head cannot be split 8 ways; replicating that one dim
    is what a user wants, not a compile error.
    """
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept, size = [], 1
        for name in names:
            if mesh.shape[name] > 1 and dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return _fsdp_fill(shape, out, mesh)


def _fsdp_fill(shape: Sequence[int], spec: list, mesh: jax.sharding.Mesh) -> P:
    """ZeRO-3: a tensor the rules left unsplit over 'fsdp' (a bias, a norm scale, a head whose
    'vocab' axis maps to 'tensor') is split over 'fsdp' along its largest divisible free dim, so
    params + optimizer state really divide by the fsdp size. Scalars stay replicated."""
    n = mesh.shape.get("fsdp", 1)
    used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
    if n > 1 and "fsdp" not in used:
        def split(s):
            return () if s is None else (s if isinstance(s, tuple) else (s,))
        def ways(s):
            return int(np.prod([mesh.shape[a] for a in split(s)])) if split(s) else 1
        fits = [i for i, (d, s) in enumerate(zip(shape, spec)) if d % (ways(s) * n) == 0]
        if fits:  # prefer a free dim, then the largest remaining share
            i = max(fits, key=lambda i: (spec[i] is None, shape[i] // ways(spec[i])))
            spec[i] = "fsdp" if spec[i] is None else split(spec[i]) + ("fsdp",)
    return P(*spec)


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
    """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` (logical axis names).

    Returns a tree with the structure of ``nn.unbox(abstract_tree)``.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, [tuple(r) for r in rules])
    values = nn.unbox(abstract_tree)
    return jax.tree.map(
        lambda s, v: NamedSharding(mesh, _fit_spec(v.shape, s, mesh)),
        mesh_specs, values, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def host_batch_to_global(batch: Any, mesh: jax.sharding.Mesh, global_batch_size: int) -> Any:
    """Host-local numpy batch -> global jax.Array sharded over the batch axes.

    Each process passes only its own rows (global_batch_size / process_count of them); with one
    process this is a plain sharded device_put.
    """
    def place(x):
        x = np.asarray(x)
        global_shape = (global_batch_size,) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
    return jax.tree.map(place, batch)


def local_batch_size(global_batch_size: int) -> int:
    return global_batch_size // jax.process_count()


def bytes_per_device(tree: Any) -> dict:
    """Bytes of ``tree``'s shards held by each local device (to check FSDP really splits)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def log_mesh(mesh: jax.sharding.Mesh) -> None:
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
                 jax.process_count())
