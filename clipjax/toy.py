"""A toy task trained through the real substrate: MLP regression onto a fixed random teacher.

It exists to test (and demonstrate) the shared trainer without any model code:

    python -m clipjax.toy --config=configs/toy/mlp.py --workdir=/tmp/toy
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import time

from clipjax.task import Task


class MLP(nn.Module):
    """x: b d -> y: b o. Parameters carry logical axis names so FSDP/TP can split them."""
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
        h = nn.with_logical_constraint(nn.gelu(h), ("batch", "mlp"))
        h = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="fc2")(h)
        h = nn.gelu(h)
        return nn.Dense(self.out, kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), name="head")(h)


def _teacher(seed: int, d_in: int, d_out: int) -> np.ndarray:
    return np.random.default_rng(seed + 12345).normal(size=(d_in, d_out)).astype(np.float32) / np.sqrt(d_in)


def make_data(config):
    d_in, d_out = config.model.d_in, config.model.d_out
    w = _teacher(config.seed, d_in, d_out)

    def data(start_step: int, process_index: int, process_count: int):
        local = config.batch_size // process_count
        step = start_step
        while True:
            # Batch content is a pure function of (seed, step): resume needs no replay.
            rng = np.random.default_rng([config.seed, step])
            x = rng.normal(size=(config.batch_size, d_in)).astype(np.float32)
            x = x[process_index * local:(process_index + 1) * local]
            if config.model.data_delay_s:  # a slow input pipeline, for kill/preemption tests
                time.sleep(config.model.data_delay_s)
            yield {"x": x, "y": np.tanh(x @ w)}
            step += 1
    return data


def make_task(config) -> Task:
    model = MLP(hidden=config.model.hidden, out=config.model.d_out)

    def init(rng):
        return model.init(rng, jnp.zeros((1, config.model.d_in), jnp.float32))

    def loss(params, model_state, batch, rng, step):
        pred = model.apply({"params": params}, batch["x"])
        mse = jnp.mean((pred - batch["y"]) ** 2)
        # Fault injection for the non-finite handling tests: NaN loss at one step.
        mse = jnp.where(step == config.model.nan_at_step, jnp.nan, mse)
        return mse, {"mse": mse}, model_state

    data = make_data(config)

    def heldout(params, model_state, step):
        batch = next(data(10**6, 0, 1))
        pred = model.apply({"params": params}, batch["x"])
        return {"mse": float(jnp.mean((pred - batch["y"]) ** 2))}

    hidden, d_in, d_out = config.model.hidden, config.model.d_in, config.model.d_out
    flops = 6 * (d_in * hidden + hidden * hidden + hidden * d_out)
    return Task(name="toy-mlp", init=init, loss=loss, data=data,
                evaluators={"heldout": heldout}, flops_per_example=flops)


def run():
    from clipjax import cli
    cli.run_main(cli.train_main)


if __name__ == "__main__":
    run()
