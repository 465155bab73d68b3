"""dVAE training as in the DALL-E paper, through the shared trainer.

    python -m dallejax.train_dvae --config=configs/dvae/digits.py --workdir=/tmp/dvae_digits

Objective (dallejax.dvae.dvae_loss): Gumbel-softmax relaxation with temperature annealed
1 -> 1/16, KL to the uniform prior weighted 0 -> 6.6, logit-Laplace likelihood; AdamW; cosine
learning-rate decay; an EMA of the parameters is what evaluation (and export) uses.
Data: the CLIP input pipeline (any of its sources), images mapped back to [0, 1].
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipjax.task import Task
from dallejax import dvae

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def to_unit(images: np.ndarray) -> np.ndarray:
    """CLIP-normalised pipeline images -> [0, 1] pixels (the dVAE's input space)."""
    return np.clip(np.asarray(images) * CLIP_STD + CLIP_MEAN, 0.0, 1.0).astype(np.float32)


def image_data_fn(config):
    """Task.data: the pipeline's batches, images only, in [0, 1]."""
    from clipjax.data import pipeline

    def data(start_step, process_index, process_count):
        for batch in pipeline.make_train_iterator(config, start_step, process_index, process_count):
            yield {"image": to_unit(batch["images"])}
    return data


def load_eval_images(config, max_images: int) -> np.ndarray:
    from clipjax.data import pipeline
    from clipjax.train import _Subset
    source = _Subset(pipeline.make_source(config.data, "eval"), max_images)
    out = []
    for batch in pipeline.make_eval_iterator(config, batch_size=min(128, len(source)), source=source):
        out.append(to_unit(batch["images"])[np.asarray(batch["mask"])])
    return np.concatenate(out)


def dvae_task(config: ml_collections.ConfigDict) -> Task:
    try:
        model = dvae.model_from_config(config)
    except (ValueError, TypeError) as e:
        from clipjax.config import ConfigError
        raise ConfigError(f"config.model: {e}") from None
    if config.data.image_size != model.image_size:
        from clipjax.config import ConfigError
        raise ConfigError(f"config.data.image_size={config.data.image_size} but config.model.image_size="
                          f"{model.image_size}; make them equal")
    size, c = model.image_size, model.input_channels

    def init(rng):
        return model.init(rng, jnp.zeros((1, size, size, c), jnp.float32))

    def loss(params, model_state, batch, rng, step):
        value, metrics = dvae.dvae_loss({"params": params}, batch, rng, step, config)
        return value, metrics, model_state

    workdir = config.get("workdir_for_images", "")

    @functools.lru_cache(maxsize=1)
    def eval_images():
        return load_eval_images(config, int(config.eval.num_images))

    def reconstruction(params, model_state, step):
        images = eval_images()
        metrics = dvae.reconstruction_metrics(model, {"params": params}, images)
        if workdir and jax.process_index() == 0:
            from dallejax.images import save_grid
            n = min(16, len(images))
            recon = _reconstruct(model, {"params": params}, images[:n])
            os.makedirs(os.path.join(workdir, "reconstructions"), exist_ok=True)
            save_grid(os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"),
                      np.concatenate([images[:n], recon]), cols=n)
        return {k: v for k, v in metrics.items() if k != "num_images"}

    return Task(name=f"dvae:{model.vocab_size}x{model.token_grid}x{model.token_grid}", init=init, loss=loss,
                data=image_data_fn(config), evaluators={"recon": reconstruction})


def _reconstruct(model, variables, images):
    @jax.jit
    def fn(v, x):
        return model.apply(v, model.apply(v, x, method=dvae.DVAE.encode), method=dvae.DVAE.decode)
    return np.asarray(fn(variables, jnp.asarray(images)))


def run():
    from clipjax import cli
    cli.run_main(cli.train_main)


if __name__ == "__main__":
    run()
