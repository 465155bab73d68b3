"""What a trainer trains. The substrate (clipjax.trainer) decides how.

A Task is plain functions and data; it never sees meshes, checkpoints or devices. CLIP, the dVAE
and the DALL-E transformer each build one; the same loop trains all of them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax

Batch = Mapping[str, Any]
# (params, model_state, batch, rng, step) -> (loss, metrics, new_model_state)
LossFn = Callable[[Any, Any, Batch, jax.Array, jax.Array], tuple[jax.Array, dict, Any]]
# (start_step, process_index, process_count) -> host-local numpy batches for steps start_step, ...
DataFn = Callable[[int, int, int], Iterator[Batch]]
# (params, model_state, step) -> scalar metrics; EMA params are passed when the run keeps them
EvalFn = Callable[[Any, Any, int], Mapping[str, float]]


@dataclasses.dataclass
class Task:
    """A trainable job.

    Attributes:
      name: model identity; stored in checkpoints so a workdir of another model is refused.
      init: rng -> variables dict; ``variables['params']`` are trained (leaves may be boxed with
        logical axis names via ``nn.with_logical_partitioning``); other collections (e.g.
        ``batch_stats``) are carried as model state.
      loss: see LossFn. Called inside jit on a (micro)batch of global jax.Arrays.
      data: see DataFn. Must be deterministic in (config seed, step) so resume needs no replay.
      evaluators: name -> EvalFn, run every ``config.train.eval_every`` steps and at the end.
      flops_per_example: training FLOPs per example (forward + backward) for MFU; 0 = unknown.
      frozen: parameter path prefixes the task keeps frozen (e.g. LiT's image tower), in
        addition to ``config.optim.freeze``.
    """
    name: str
    init: Callable[[jax.Array], Mapping[str, Any]]
    loss: LossFn
    data: DataFn
    evaluators: Mapping[str, EvalFn] = dataclasses.field(default_factory=dict)
    flops_per_example: float = 0.0
    frozen: tuple = ()
