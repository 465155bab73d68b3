"""Fine-tuning CLIP's image tower for classification, on the shared trainer.

    python -m clipjax.finetune --config=configs/clip/finetune_digits.py --workdir=/tmp/ft_digits

The classifier is ``logits = normalize(encode_image(x)) @ W + b``. ``W: e c`` starts as the
zero-shot classifier (per class, the normalised mean of its prompt-template text embeddings)
times the CLIP logit scale, and ``b`` at zero, so step 0 predicts exactly what zero-shot CLIP
predicts: fine-tuning starts from the zero-shot accuracy instead of from chance, which is why
it is the recipe tutorials (and WiSE-FT / FLYP style work) start from. The text tower is used
once, to build ``W``, and is not part of the trained state.

Where the CLIP weights come from (one of):
  * ``config.init.workdir`` + ``config.init.config``: the latest (or ``config.init.step``)
    checkpoint of a ``clipjax.train`` run and the config file that run used; the architecture
    is that run's ``config.model``.
  * ``config.model.init_from``: a clipjax ``.msgpack`` or open_clip/OpenAI checkpoint for the
    registry model ``config.model.name``.

``config.finetune.freeze_image=True`` trains only the head (a linear probe initialised from
zero-shot). The evaluator ``accuracy`` reports top-1/top-5 on ``config.data``'s eval split.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipjax.config import ConfigError
from clipjax.task import Task


def finetune_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults for ``config.finetune``."""
    c = ml_collections.ConfigDict(dict(
        freeze_image=False,     # True: train the head only (zero-shot-initialised linear probe)
        templates=(),           # prompt templates for the head; () = the dataset's own set
        label_smoothing=0.0,
        eval_at_start=True,     # the CLI reports the starting (zero-shot head) accuracy too
        max_eval_examples=0,    # 0 = the whole eval split
    ))
    c.update(overrides)
    return c


def init_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults for ``config.init``: the clipjax.train run to start from."""
    c = ml_collections.ConfigDict(dict(
        workdir="",             # a clipjax.train workdir (its checkpoints/)
        config="",              # the config file that run used (e.g. configs/clip/digits_tiny.py)
        step=0,                 # 0 = the latest checkpoint
        use_ema=True,           # take the EMA parameters when the run kept them
    ))
    c.update(overrides)
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (what ``--config=path`` would load)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config.init.config={path!r}: no such file; give the config file of the "
                          f"clipjax.train run in config.init.workdir")
    spec = importlib.util.spec_from_file_location(f"_clipjax_init_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config.init.config={path!r} has no get_config()")
    return module.get_config()


# ---- the starting point -----------------------------------------------------------------------
def _init_source(config) -> str:
    init = config.get("init", init_config())
    if init.workdir and config.model.get("init_from", ""):
        raise ConfigError("both config.init.workdir and config.model.init_from are set; keep one "
                          "(a clipjax.train workdir, or a weights file)")
    if init.workdir:
        if not init.config:
            raise ConfigError("config.init.workdir is set but config.init.config is empty; give the config "
                              "file the run used (e.g. --config.init.config=configs/clip/digits_tiny.py)")
        return "workdir"
    if config.model.get("init_from", ""):
        return "weights"
    raise ConfigError("nothing to fine-tune from: set config.init.workdir (+ config.init.config) to a "
                      "clipjax.train run, or config.model.init_from to a weights file")


def clip_model_config(config) -> ml_collections.ConfigDict:
    """The ``model`` section describing the CLIP architecture being fine-tuned."""
    if _init_source(config) == "weights":
        if not config.model.get("name", ""):
            raise ConfigError(f"config.model.init_from={config.model.init_from!r} needs config.model.name, the "
                              f"registry architecture of those weights (e.g. --config.model.name=ViT-B-32)")
        return config.model
    run_cfg = load_config_file(config.init.config)
    name = config.model.get("name", "")
    if name and name != run_cfg.model.name:
        raise ConfigError(f"config.model.name={name!r} but the run in config.init.workdir trained "
                          f"{run_cfg.model.name!r}; set config.model.name='' (taken from the run)")
    return run_cfg.model


_CACHE: dict = {}   # init source -> loaded CLIP (the task factory may be called more than once)


def _load_clip(config) -> tuple:
    """(model, host params, host model_state) of the CLIP model to fine-tune."""
    from clipjax import train as clip_train, trainer
    if _init_source(config) == "weights":
        model = clip_train.build_model(config.model)
        variables = jax.device_get(clip_train._load_init_weights(config.model.init_from, model))
        variables = dict(variables)
        return model, variables.pop("params"), variables
    run_cfg = load_config_file(config.init.config)
    run_cfg.model.count_flops = False
    if not os.path.isdir(os.path.join(config.init.workdir, "checkpoints")):
        raise ConfigError(f"config.init.workdir={config.init.workdir!r} has no checkpoints/; train it first "
                          f"(python -m clipjax.train --config={config.init.config} --workdir=...)")
    model = clip_train.build_model(run_cfg.model)
    state = trainer.restore_state(run_cfg, config.init.workdir, step=int(config.init.step) or None)
    params = state.eval_params() if config.init.use_ema else state.params
    return model, jax.device_get(params), jax.device_get(state.model_state)


def load_clip(config) -> tuple:
    """(CLIP module, params, model_state) as host numpy trees; cached per init source."""
    key = f"{config.get('init', init_config()).to_json()}|{config.model.to_json()}"
    if key not in _CACHE:
        _CACHE.clear()  # keep one model's weights alive at most
        _CACHE[key] = _load_clip(config)
    return _CACHE[key]


def zero_shot_head(model, params, classnames, templates) -> tuple[np.ndarray, np.ndarray]:
    """``kernel: e c`` = logit_scale * zero-shot class embeddings, ``bias: c`` = 0."""
    from clipjax.evals import zero_shot
    from clipjax.tokenizer import Tokenizer
    tokenizer = Tokenizer(context_length=model.config.text.context_length)
    w = zero_shot.zero_shot_weights(model, {"params": params}, tokenizer, list(classnames), list(templates))
    scale = float(np.exp(np.asarray(params["logit_scale"], np.float32)))
    return (scale * w).astype(np.float32), np.zeros((w.shape[1],), np.float32)


def _classes_and_templates(config):
    from clipjax.data import pipeline
    from clipjax.evals import classnames as cn
    src = pipeline.make_source(config.data, "eval")
    if not src.classnames:
        raise ConfigError(f"config.data (source={config.data.source!r}): the eval source has no class names; "
                          f"fine-tuning for classification needs a labelled dataset (digits, shapes, tfds "
                          f"with label_key, shards with labels)")
    if not pipeline.has_labels(src):
        raise ConfigError(f"config.data (source={config.data.source!r}) has no labels; set config.data.label_key")
    ft = config.get("finetune", finetune_config())
    default = cn.templates_for(src.name)
    templates = list(ft.templates) if ft.templates else list(default)
    return src, list(src.classnames), templates


# ---- the task ---------------------------------------------------------------------------------
_KEEP = ("visual", "logit_scale", "logit_bias")   # CLIP params the classifier needs (setup creates the scalars)


def classifier_logits(model, params, model_state, images, train: bool = False, rng=None):
    """``images: b h w 3`` -> ``logits: b c`` (float32)."""
    clip_params = {k: v for k, v in params.items() if k != "head"}
    feats = model.apply({"params": clip_params, **model_state}, images, normalize=True, train=train,
                        method=model.encode_image, rngs={"dropout": rng} if rng is not None else None)
    head = params["head"]
    return feats @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)


def _boxed(value, template):
    return template.replace_boxed(jnp.asarray(value)) if isinstance(template, nn.Partitioned) else jnp.asarray(value)


def finetune_task(config: ml_collections.ConfigDict) -> Task:
    from clipjax import train as clip_train
    from clipjax.data import pipeline
    mcfg = clip_model_config(config)
    model, host_params, host_state = load_clip(config)
    size = model.config.vision.image_size
    if config.data.image_size != size:
        raise ConfigError(f"config.data.image_size={config.data.image_size} but the model takes {size} px; "
                          f"set config.data.image_size={size}")
    _, classnames, templates = _classes_and_templates(config)
    kernel, bias = zero_shot_head(model, host_params, classnames, templates)
    ft = config.get("finetune", finetune_config())
    ctx = model.config.text.context_length
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                 jnp.zeros((1, ctx), jnp.int32)))

    def init(rng):
        del rng  # everything comes from the CLIP weights
        params = {k: jax.tree.map(_boxed, host_params[k], template["params"][k],
                                  is_leaf=lambda x: isinstance(x, nn.Partitioned))
                  for k in _KEEP if k in host_params}
        params["head"] = {
            "kernel": nn.LogicallyPartitioned(jnp.asarray(kernel, model.param_dtype), names=("embed", None)),
            "bias": nn.LogicallyPartitioned(jnp.asarray(bias, model.param_dtype), names=(None,)),
        }
        state = {k: jax.tree.map(jnp.asarray, v) for k, v in host_state.items()}
        return {"params": params, **state}

    smoothing = float(ft.label_smoothing)

    def loss(params, model_state, batch, rng, step):
        logits = classifier_logits(model, params, model_state, batch["images"], train=True, rng=rng)
        logits = nn.with_logical_constraint(logits, ("batch", None))
        labels = jax.nn.one_hot(batch["labels"], logits.shape[-1])
        if smoothing:
            labels = optax.smooth_labels(labels, smoothing)
        value = optax.softmax_cross_entropy(logits, labels).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
        return value, {"accuracy": acc}, model_state

    frozen = ("logit_scale", "logit_bias") + (("visual",) if ft.freeze_image else ())
    flops = _image_flops(model, size) if mcfg.get("count_flops", True) else 0.0
    return Task(name=f"finetune:{mcfg.name}:{len(classnames)}", init=init, loss=loss,
                data=pipeline.make_data_fn(config), evaluators={"accuracy": make_accuracy_evaluator(config, model)},
                flops_per_example=flops, frozen=frozen)


def _image_flops(model, size: int) -> float:
    """Training FLOPs per example: 3x the image tower's forward (XLA cost analysis)."""
    try:
        shapes = jax.eval_shape(lambda: nn.unbox(model.init(
            jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, model.config.text.context_length),
                                                                        jnp.int32))))
        fwd = lambda v, x: model.apply(v, x, method=model.encode_image)
        cost = jax.jit(fwd).lower(shapes, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost.get("flops", 0.0))
    except Exception as e:  # best effort: MFU is then omitted
        logging.warning("could not estimate FLOPs: %s", e)
        return 0.0


def make_accuracy_evaluator(config, model):
    """``(params, model_state, step) -> {'top1', 'top5'}`` on ``config.data``'s eval split."""
    from clipjax.data import pipeline
    from clipjax.evals import zero_shot
    from clipjax.train import _Subset, load_eval_arrays
    ft = config.get("finetune", finetune_config())

    @functools.lru_cache(maxsize=1)
    def eval_set():
        src = pipeline.make_source(config.data, "eval")
        return load_eval_arrays(config, _Subset(src, int(ft.max_eval_examples)))

    predict = jax.jit(lambda p, s, x: classifier_logits(model, p, s, x))

    def evaluate(params, model_state, step):
        arrays = eval_set()
        images, labels = arrays["images"], arrays["labels"]
        bs = min(256, len(images))
        logits = []
        for i in range(0, len(images), bs):
            chunk = images[i:i + bs]
            pad = bs - len(chunk)
            if pad:  # one compiled shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            logits.append(np.asarray(predict(params, model_state, jnp.asarray(chunk)))[:bs - pad])
        return zero_shot.accuracy(np.concatenate(logits), np.asarray(labels))
    return evaluate


# ---- CLI --------------------------------------------------------------------------------------
def finetune_main(config, workdir: str) -> int:
    from clipjax import checkpoint as ckpt_lib, parallel, trainer
    parallel.maybe_initialize_distributed(config.distributed)
    task = finetune_task(config)
    ft = config.get("finetune", finetune_config())
    fresh = not workdir or ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                 async_save=False).latest_step() is None
    start = {}
    if ft.eval_at_start and fresh:
        variables = dict(nn.unbox(task.init(jax.random.key(0))))
        params = variables.pop("params")
        start = task.evaluators["accuracy"](params, variables, 0)
    result = trainer.train(task, config, workdir)
    if jax.process_index() == 0:
        ev = result.eval_metrics
        line = f"{result.status} at step {int(jax.device_get(result.state.step))}: "
        if start:
            line += f"zero-shot head top1={start['top1']:.4f} -> "
        line += " ".join(f"{k}={v:.4f}" for k, v in ev.items())
        if "loss" in result.last_metrics:
            line += f" loss={result.last_metrics['loss']:.4f}"
        print(line, flush=True)
    return 0


def run():
    from clipjax import cli
    cli.run_main(finetune_main)


if __name__ == "__main__":
    run()
