"""CLIP training: the task (model + contrastive loss + data + evaluators) and its CLI.

    python -m clipjax.train --config=configs/clip/digits_tiny.py --workdir=/tmp/clip_digits

The task says *what* is trained; clipjax.trainer says how (sharding, accumulation, checkpoints).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipjax import losses
from clipjax.config import ConfigError
from clipjax.models.clip import CLIP
from clipjax.models.registry import create_model, get_model_config
from clipjax.task import Task

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults for ``config.model`` of the CLIP task."""
    c = ml_collections.ConfigDict(dict(
        name="ViT-B-32",        # a clipjax.models registry name (open_clip's names)
        overrides={},           # CLIPConfig overrides, e.g. {'text_context_length': 16}
        loss="softmax",         # softmax (CLIP) | sigmoid (SigLIP)
        dtype="float32",        # compute dtype; params stay param_dtype
        param_dtype="float32",
        scan=False,             # nn.scan over blocks: compile once for deep models
        remat_policy="none",    # none | full | dots_saveable | ...
        patch_dropout=0.0,      # FLIP: fraction of image patches dropped in training
        init_from="",           # weights to start from (.msgpack / open_clip / OpenAI checkpoint)
        lock_image=False,       # LiT: freeze the image tower (use with init_from)
        count_flops=True,       # estimate FLOPs/example (XLA cost analysis) for MFU
    ))
    c.update(overrides)
    return c


def build_model(mcfg) -> CLIP:
    for key in ("dtype", "param_dtype"):
        if mcfg[key] not in _DTYPES:
            raise ConfigError(f"config.model.{key}={mcfg[key]!r}: use one of {sorted(_DTYPES)}")
    if mcfg.loss not in ("softmax", "sigmoid"):
        raise ConfigError(f"config.model.loss={mcfg.loss!r}: use 'softmax' or 'sigmoid'")
    overrides = dict(mcfg.overrides)
    if mcfg.patch_dropout:
        overrides["vision_patch_dropout"] = float(mcfg.patch_dropout)
    if mcfg.loss == "sigmoid":  # SigLIP init: t = 10, b = -10
        overrides.setdefault("init_logit_scale", float(np.log(10.0)))
        overrides.setdefault("init_logit_bias", -10.0)
    try:
        get_model_config(mcfg.name, **overrides)
    except ValueError as e:
        raise ConfigError(f"config.model.name/overrides: {e}") from None
    return create_model(mcfg.name, dtype=_DTYPES[mcfg.dtype], param_dtype=_DTYPES[mcfg.param_dtype],
                        scan=bool(mcfg.scan), remat_policy=mcfg.remat_policy, **overrides)


def _check_data_matches_model(config, model: CLIP) -> None:
    size, ctx = model.config.vision.image_size, model.config.text.context_length
    if config.data.image_size != size:
        raise ConfigError(f"config.data.image_size={config.data.image_size} but model "
                          f"{config.model.name!r} takes {size} px; set config.data.image_size={size}")
    if config.data.context_length != ctx:
        raise ConfigError(f"config.data.context_length={config.data.context_length} but the model's text "
                          f"context is {ctx}; set config.data.context_length={ctx}")


def _load_init_weights(path: str, model: CLIP) -> dict:
    from clipjax import convert
    from clipjax.models.layers import stack_layers
    if path.endswith(".msgpack"):
        _, variables, _ = convert.load_clipjax(path)
    else:
        variables = convert.torch_to_clipjax(convert.read_checkpoint(path), model)
    return stack_layers(variables) if model.scan else variables


def _boxed_like(loaded: Any, boxed_template: Any) -> Any:
    """Loaded plain arrays, re-wrapped in the template's logical-axis boxes."""
    return jax.tree.map(lambda box, v: box.replace_boxed(jnp.asarray(v)) if isinstance(box, nn.Partitioned)
                        else jnp.asarray(v), boxed_template, loaded,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def estimate_train_flops(model: CLIP, image_size: int, context_length: int) -> float:
    """Training FLOPs per example (3x the forward pass, from XLA's cost analysis of one example)."""
    def fwd(params, images, tokens):
        return model.apply({"params": params}, images, tokens)
    try:
        shapes = jax.eval_shape(lambda: nn.unbox(model.init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), jnp.zeros((1, context_length), jnp.int32))))
        lowered = jax.jit(fwd).lower(shapes["params"], jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
                                     jax.ShapeDtypeStruct((1, context_length), jnp.int32))
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return 3.0 * float(cost.get("flops", 0.0))
    except Exception as e:  # cost analysis is best-effort; MFU is then omitted
        logging.warning("could not estimate FLOPs: %s", e)
        return 0.0


def clip_task(config: ml_collections.ConfigDict) -> Task:
    mcfg = config.model
    model = build_model(mcfg)
    _check_data_matches_model(config, model)
    size, ctx = model.config.vision.image_size, model.config.text.context_length
    resnet = model.config.vision.is_resnet

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), jnp.zeros((1, ctx), jnp.int32))
        if mcfg.init_from:
            loaded = _load_init_weights(mcfg.init_from, model)
            variables = {k: _boxed_like(loaded[k], v) if k in loaded else v for k, v in variables.items()}
        return variables

    def loss(params, model_state, batch, rng, step):
        # ResNet BatchNorm runs in inference mode (running statistics frozen), as in fine-tuning
        # OpenAI's RN models; its statistics are carried unchanged in model_state.
        out = model.apply({"params": params, **model_state}, batch["images"], batch["tokens"], train=True,
                          rngs={"dropout": rng})
        img = nn.with_logical_constraint(out["image_features"], ("batch", None))
        txt = nn.with_logical_constraint(out["text_features"], ("batch", None))
        if mcfg.loss == "sigmoid":
            value, metrics = losses.sigmoid_contrastive_loss(img, txt, params["logit_scale"], params["logit_bias"])
        else:
            value, metrics = losses.softmax_contrastive_loss(img, txt, params["logit_scale"])
        return value, metrics, model_state

    from clipjax.data import pipeline
    return Task(name=f"clip:{mcfg.name}", init=init, loss=loss, data=pipeline.make_data_fn(config),
                evaluators=make_evaluators(config, model),
                flops_per_example=estimate_train_flops(model, size, ctx) if mcfg.count_flops else 0.0,
                frozen=("visual",) if mcfg.lock_image else ())


# ---- evaluators -------------------------------------------------------------------------------
def eval_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        zero_shot=True, retrieval=True, linear_probe=True,
        templates="",                   # '' = the eval dataset's own set (clipjax.evals.classnames)
        max_examples=0,                 # 0 = the whole eval split
        linear_probe_train_examples=2000,
    ))
    c.update(overrides)
    return c


class _Subset:
    """The first ``n`` examples of a source (linear-probe training features)."""

    def __init__(self, source, n):
        self._s, self._n = source, min(n, len(source)) if n else len(source)
        self.kind, self.name, self.classnames = source.kind, source.name, source.classnames
        self.has_labels = getattr(source, "has_labels", None)

    def __len__(self):
        return self._n

    def get(self, i):
        return self._s.get(i)

    def captions(self, i):
        return self._s.captions(i)

    def for_process(self, pi, pc):
        return self, "global"


def load_eval_arrays(config, source) -> dict:
    """Images (eval transform), labels and first captions of ``source``, as numpy (masked rows dropped)."""
    from clipjax.data import pipeline
    it = pipeline.make_eval_iterator(config, batch_size=min(256, max(len(source), 1)), source=source)
    parts: dict = {"images": [], "labels": [], "tokens": []}
    for batch in it:
        m = np.asarray(batch["mask"])
        parts["images"].append(np.asarray(batch["images"])[m])
        parts["tokens"].append(np.asarray(batch["tokens"])[m])
        if "labels" in batch:
            parts["labels"].append(np.asarray(batch["labels"])[m])
    out = {k: np.concatenate(v) for k, v in parts.items() if v}
    out["skipped"] = it.skipped
    return out


def make_evaluators(config, model: CLIP) -> dict:
    """Zero-shot / retrieval / linear probe on ``config.data``'s eval split, chosen by ``config.eval``."""
    from clipjax.data import pipeline
    from clipjax.evals import classnames as cn, linear_probe, retrieval, zero_shot
    from clipjax.tokenizer import Tokenizer
    ecfg = config.get("eval", eval_config())
    tokenizer = Tokenizer(context_length=model.config.text.context_length)

    @functools.lru_cache(maxsize=1)
    def eval_set():
        src = pipeline.make_source(config.data, "eval")
        return src, load_eval_arrays(config, _Subset(src, ecfg.max_examples))

    @functools.lru_cache(maxsize=1)
    def probe_train_set():
        src = pipeline.make_source(config.data, "train")
        return load_eval_arrays(config, _Subset(src, ecfg.linear_probe_train_examples))

    def variables(params, model_state):
        return {"params": params, **model_state}

    evaluators = {}
    if ecfg.zero_shot:
        def zs(params, model_state, step):
            src, arrays = eval_set()
            if not src.classnames or "labels" not in arrays:
                return {}
            templates = list(ecfg.templates) if ecfg.templates else list(cn.templates_for(src.name))
            return zero_shot.evaluate(model, variables(params, model_state), tokenizer, arrays["images"],
                                      arrays["labels"], src.classnames, templates)
        evaluators["zero_shot"] = zs
    if ecfg.retrieval:
        def ret(params, model_state, step):
            _, arrays = eval_set()
            return retrieval.evaluate(model, variables(params, model_state), arrays["images"], arrays["tokens"],
                                      np.arange(len(arrays["images"])))
        evaluators["retrieval"] = ret
    if ecfg.linear_probe:
        def lp(params, model_state, step):
            _, test = eval_set()
            train = probe_train_set()
            if "labels" not in test or "labels" not in train:
                return {}
            return linear_probe.evaluate(model, variables(params, model_state), train["images"], train["labels"],
                                         test["images"], test["labels"])
        evaluators["linear_probe"] = lp
    return evaluators


def run():
    from clipjax import cli
    cli.run_main(cli.train_main)


if __name__ == "__main__":
    run()
