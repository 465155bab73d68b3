"""The one training loop, shared by the CLIP, dVAE and DALL-E trainers.

    state  = sharded init (jax.jit with out_shardings: never materialised on one device)
             or the latest checkpoint in workdir, restored onto the current mesh
    loop:  host-local numpy batch -> global jax.Array -> jitted step (grad accumulation,
           donated state) -> metrics / evals / async checkpoint; SIGTERM -> save and return

Every random draw derives from (config.seed, step) and every batch from (seed, step), so a run
killed at any moment and restarted computes bitwise the same parameters as one never stopped.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import checkpoint as ckpt_lib
from clipjax import config as config_lib
from clipjax import metrics as metrics_lib
from clipjax import optim, parallel
from clipjax.task import Task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any            # non-trained collections, e.g. batch_stats
    ema_params: Any             # None unless config.optim.ema_decay > 0
    nonfinite_count: jax.Array  # updates skipped because loss/grads were not finite
    first_nonfinite_step: jax.Array  # -1 while every update has been finite

    def eval_params(self):
        return self.ema_params if self.ema_params is not None else self.params


class NonFiniteError(FloatingPointError):
    pass


def load_task(config: ml_collections.ConfigDict) -> Task:
    module_name, _, factory = config.task.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise config_lib.ConfigError(f"config.task={config.task!r}: cannot import {module_name!r} ({e})")
    if not hasattr(module, factory):
        raise config_lib.ConfigError(f"config.task={config.task!r}: {module_name} has no {factory!r}")
    return getattr(module, factory)(config)


class Trainer:
    """Builds sharded state and the compiled step for one task on one mesh."""

    def __init__(self, task: Task, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        self.task, self.config = task, config
        self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
        self.rules = tuple(tuple(r) for r in config.sharding.rules)
        self.tx = optim.make_optimizer(config.optim, int(config.total_steps), tuple(task.frozen))
        self.schedule = optim.make_schedule(config.optim, int(config.total_steps))
        self.accum = int(config.grad_accum_steps)
        self.base_key = jax.random.key(int(config.seed))
        with self.activate():
            self.abstract_boxed = jax.eval_shape(self._init_boxed, self.base_key)
        self.state_shardings = parallel.logical_shardings(self.abstract_boxed, self.mesh, self.rules)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            nn.unbox(self.abstract_boxed), self.state_shardings)
        self._step_fn = None

    def activate(self):
        """Mesh + logical rules, active while tracing so activation constraints resolve."""
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # ---- state -------------------------------------------------------------------------------
    def _init_boxed(self, key) -> TrainState:
        variables = dict(self.task.init(jax.random.fold_in(key, 0x1417)))
        params = variables.pop("params")
        ema = params if self.config.optim.ema_decay > 0 else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          model_state=variables, ema_params=ema,
                          nonfinite_count=jnp.zeros((), jnp.int32),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32))

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its shards."""
        init = jax.jit(lambda k: nn.unbox(self._init_boxed(k)), out_shardings=self.state_shardings)
        with self.activate():
            return init(self.base_key)

    def meta(self) -> dict:
        return {"task": self.task.name,
                "param_shapes": ckpt_lib.param_shapes(self.abstract_state.params)}

    # ---- the step ----------------------------------------------------------------------------
    def _grads(self, params, model_state, batch, rng, step):
        def loss_fn(p, mb, r, ms):
            loss, metrics, new_ms = self.task.loss(p, ms, mb, r, step)
            return loss, (metrics, new_ms)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if self.accum == 1:
            (loss, (metrics, new_ms)), grads = grad_fn(params, batch, rng, model_state)
            return loss, metrics, new_ms, grads

        # Microbatch k takes rows k, k+A, k+2A, ... so every microbatch stays spread over all
        # devices (a plain reshape would put microbatch 0 on the first devices only).
        def split(x):
            x = x.reshape((x.shape[0] // self.accum, self.accum) + x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(
                x, NamedSharding(self.mesh, P(None, parallel.BATCH_AXES, *([None] * (x.ndim - 2)))))
        micro = jax.tree.map(split, batch)

        def body(carry, xs):
            g_sum, l_sum, m_sum, ms = carry
            mb, i = xs
            (loss, (metrics, ms)), g = grad_fn(params, mb, jax.random.fold_in(rng, i), ms)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss,
                    jax.tree.map(jnp.add, m_sum, metrics), ms), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        m0 = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), rng, model_state)[1][0])
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (g, l, m, ms), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), m0, model_state),
                                        (micro, jnp.arange(self.accum)))
        scale = 1.0 / self.accum
        return l * scale, jax.tree.map(lambda x: x * scale, m), ms, jax.tree.map(lambda x: x * scale, g)

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(self.base_key, state.step)
        loss, metrics, new_ms, grads = self._grads(state.params, state.model_state, batch, rng, state.step)
        finite = jnp.isfinite(loss) & optim.all_finite(grads)
        updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_params, new_opt = keep(new_params, state.params), keep(new_opt, state.opt_state)
        new_ms = keep(new_ms, state.model_state)
        ema = state.ema_params
        if ema is not None:
            ema = keep(optim.ema_update(ema, new_params, float(self.config.optim.ema_decay)), ema)
        new_state = state.replace(
            step=state.step + 1, params=new_params, opt_state=new_opt, model_state=new_ms, ema_params=ema,
            nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite,
                                           state.step, state.first_nonfinite_step))
        metrics = dict(metrics, loss=loss, grad_norm=optim.global_norm(grads),
                       lr=self.schedule(state.step), update_skipped=(~finite).astype(jnp.float32))
        return new_state, metrics

    @property
    def step_fn(self):
        if self._step_fn is None:
            self._step_fn = jax.jit(self._train_step, donate_argnums=(0,),
                                    out_shardings=(self.state_shardings, None))
        return self._step_fn

    def step(self, state: TrainState, global_batch) -> tuple[TrainState, dict]:
        with self.activate():
            return self.step_fn(state, global_batch)

    def place_batch(self, host_batch) -> Any:
        expected = parallel.local_batch_size(int(self.config.batch_size))
        for k, v in host_batch.items():
            if np.shape(v)[0] != expected:
                raise ValueError(f"data batch {k!r} has {np.shape(v)[0]} rows on process "
                                 f"{jax.process_index()}, expected {expected} "
                                 f"(config.batch_size / process_count)")
        return parallel.host_batch_to_global(host_batch, self.mesh, int(self.config.batch_size))


class _Preemption:
    """SIGTERM (the TPU/SLURM preemption notice) sets a flag; the loop saves and returns."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def agreed(self) -> bool:
        """All processes agree (one host may get the signal first)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    status: str                      # "done" | "preempted"
    last_metrics: dict
    eval_metrics: dict
    start_step: int


def train(task: Task, config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh | None = None) -> TrainResult:
    """Trains ``task`` to ``config.total_steps``, resuming from ``workdir`` if it has a checkpoint."""
    config_lib.validate(config, mesh.size if mesh is not None else jax.device_count(), jax.process_count())
    trainer = Trainer(task, config, mesh)
    parallel.log_mesh(trainer.mesh)
    total = int(config.total_steps)
    ck_cfg = config.checkpoint
    ck_every = int(ck_cfg.every_steps)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         int(ck_cfg.keep), bool(ck_cfg.async_save), writer=True) if workdir else None
    meta = trainer.meta()
    latest = checkpointer.latest_step() if checkpointer else None
    if latest is not None:
        state = checkpointer.restore(latest, trainer.abstract_state, meta)
        logging.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))

    writer = metrics_lib.MetricWriter(workdir)
    throughput = metrics_lib.Throughput(
        int(config.batch_size), total, task.flops_per_example,
        metrics_lib.peak_flops_per_device(config.train.peak_flops_per_device))
    log_every = max(int(config.train.log_every), 1)
    eval_every = int(config.train.eval_every)
    show_bar = bool(config.train.progress_bar) and jax.process_index() == 0
    bar = None
    if show_bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=task.name, unit="step", dynamic_ncols=True)

    def run_evals(step: int) -> dict:
        out = {}
        for name, fn in task.evaluators.items():
            res = fn(state.eval_params(), state.model_state, step)
            out.update({f"{name}/{k}": v for k, v in res.items()})
        if out:
            writer.write(step, out, prefix="eval/")
        return out

    def check_nonfinite():
        if config.train.nonfinite == "error":
            bad = int(jax.device_get(state.first_nonfinite_step))
            if bad >= 0:
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {bad}; the update was not applied and the "
                    f"last good checkpoint in {workdir or '(no workdir)'} is kept. Lower config.optim.lr, "
                    f"set config.optim.grad_clip_norm, or config.train.nonfinite='skip' to skip such steps")

    status, last, evals = "done", {}, {}
    data_iter = task.data(start, jax.process_index(), jax.process_count())
    window = None
    try:
        with _Preemption() as preempt:
            step = start
            throughput.update(step)
            while step < total:
                if preempt.agreed():
                    status = "preempted"
                    break
                host_batch = next(data_iter)
                state, metrics = trainer.step(state, trainer.place_batch(host_batch))
                step += 1
                window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
                window_len = (step - start) % log_every or log_every
                if step % log_every == 0 or step == total:
                    last = {k: v / window_len for k, v in metrics_lib.to_host(window).items()}
                    last.update(throughput.update(step))
                    last["nonfinite_count"] = float(jax.device_get(state.nonfinite_count))
                    # Bad examples the input pipeline skipped, by reason (never silently lost).
                    for reason, n in (getattr(data_iter, "skipped", None) or {}).items():
                        last[f"data_skipped/{reason}"] = float(n)
                    writer.write(step, last, prefix="train/")
                    window = None
                    check_nonfinite()
                    if bar is not None:
                        bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "samples_per_sec", "mfu")
                                         if k in last})
                if bar is not None:
                    bar.update(1)
                if eval_every and step % eval_every == 0 and step != total:
                    evals = run_evals(step)
                if checkpointer is not None and step != total and ck_every and step % ck_every == 0:
                    check_nonfinite()
                    checkpointer.save(step, state, meta, force=True)
        check_nonfinite()
        if checkpointer is not None and (status == "preempted" or ck_cfg.save_at_end):
            if checkpointer.latest_step() != step:
                checkpointer.save(step, state, meta, force=True)
        if status == "done" and (task.evaluators and (start < total or not evals)):
            evals = run_evals(step)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        if bar is not None:
            bar.close()
        writer.close()
    return TrainResult(state=state, status=status, last_metrics=last, eval_metrics=evals, start_step=start)


def restore_state(config: ml_collections.ConfigDict, workdir: str, task: Task | None = None,
                  mesh: jax.sharding.Mesh | None = None, step: int | None = None) -> TrainState:
    """The latest (or given) checkpointed state in ``workdir``, placed on ``mesh``."""
    task = task if task is not None else load_task(config)
    trainer = Trainer(task, config, mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                                    f"train first or pass the right --workdir")
        return checkpointer.restore(step, trainer.abstract_state, trainer.meta())
    finally:
        checkpointer.close()
