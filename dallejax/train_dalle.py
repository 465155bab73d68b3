"""DALL-E stage 2: the text+image transformer trained through the shared trainer.

    python -m dallejax.train_dalle --config=configs/dalle/digits.py --workdir=/tmp/dalle_digits \\
        --config.dvae.workdir=/tmp/dvae_digits

Objective (paper, sec. 2.2): ``1/8 * CE(text) + 7/8 * CE(image)`` over ``[caption | image tokens]``
(:mod:`dallejax.transformer`); the image tokens are the argmax codes of a FROZEN dVAE encoder
(no Gumbel noise). With probability ``config.text_dropout`` a caption is replaced by the empty
caption ``[SOT, EOT, pad...]``, the unconditional prompt of classifier-free guidance
(:func:`dallejax.sampling.sample` with ``guidance_scale``). The draw is a pure function of the
step's rng, so a resumed run drops the same captions.

Two data modes, chosen by ``config.data.source``:

* any source of the CLIP pipeline (``digits``, ``shapes``, ``tfds``, ``shards``, ``manifest``):
  captions are tokenized by the CLIP BPE (``config.data.context_length`` = the model's
  ``text_len``), images are mapped back to [0, 1] on the host and **encoded inside the jitted
  training step**. The dVAE's parameters travel in the train state's ``model_state`` (collection
  ``'dvae'``, never updated, sharded by the same logical rules as everything else): the encoder
  runs on the accelerator next to the transformer, no host round trip, no second device
  program, and a resumed run keeps the very dVAE it started with. The cost is one encoder
  forward pass per example and step, small next to the transformer's three passes.
* ``'tokens'``: shards written by ``python -m dallejax.encode_dataset`` (``config.data.path``,
  evaluation ``config.data.eval_path``): text and image tokens per record, read by position.
  Step ``s`` maps to example indices exactly as in the CLIP pipeline (position
  ``s * batch + row`` -> epoch + keyed Feistel permutation, :func:`clipjax.data.pipeline.permute`),
  so resuming needs no replay. One of the record's captions is chosen per (seed, step, row).

``config.dvae``: ``model`` (the :class:`dallejax.dvae.DVAE` fields) and ``workdir``: a
``python -m dallejax.train_dvae`` workdir (its EMA parameters), an orbax step directory, a
``.msgpack`` of DVAE params (``dallejax.generate.save_variables``), or an encoder file converted
by ``python -m dallejax.convert`` (then ``decoder`` optionally names the converted decoder, needed
only for the sample-grid evaluator).

Evaluators: ``heldout`` (loss, text/image cross-entropy and image-token accuracy on the held-out
split, captions = the first caption of each example), and ``samples`` (``config.eval.prompts``:
images sampled, decoded and saved as ``samples/step_XXXXXXX.png`` in the workdir; reports the
fraction of the code book the samples use).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipjax.checkpoint import read_eval_params
from clipjax.config import ConfigError
from clipjax.task import Task
from dallejax import dvae as dvae_lib
from dallejax import sampling
from dallejax.transformer import DalleTransformer, model_from_config, remap_text_padding

__all__ = ["loss_config", "eval_config", "dvae_model", "load_dvae_params", "dalle_task", "TokenShards",
           "token_data_fn", "pipeline_data_fn", "example_losses", "train_main", "run"]

TOKENS_SOURCE = "tokens"
_DROPOUT_TAG = 0x7D0  # folded into the step rng for the text-dropout draw


def loss_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(text_weight=1.0 / 8))  # paper: 1/8 text, 7/8 image
    c.update(overrides)
    return c


def eval_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults for ``config.eval`` of the DALL-E task."""
    c = ml_collections.ConfigDict(dict(
        heldout=True,           # held-out loss on the eval split
        num_images=512,         # held-out examples (0 = the whole split)
        batch_size=128,
        prompts=(),             # sample-grid evaluator: captions to sample (empty = off)
        samples_per_prompt=4,
    ))
    c.update(overrides)
    return c


# ------------------------------------------------------------------------------------- dVAE
def dvae_model(dvae_cfg) -> dvae_lib.DVAE:
    """The :class:`DVAE` that ``config.dvae`` describes (``config.dvae.model``, or the DVAE fields
    directly as in ``configs/dalle/tiny.py``)."""
    if dvae_cfg is None:
        raise ConfigError("config.dvae is missing: set config.dvae.model (the dVAE's fields) and "
                          "config.dvae.workdir (its weights)")
    spec = dvae_cfg.get("model", None)
    if spec is None:
        spec = {k: v for k, v in dict(dvae_cfg).items() if k not in ("workdir", "decoder")}
    try:
        return dvae_lib.model_from_config({"model": spec})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.dvae.model: {e}") from None




@functools.lru_cache(maxsize=4)
def load_dvae_params(path: str, decoder: str = "", what: str = "config.dvae.workdir") -> dict:
    """dVAE parameters ``{'encoder': ..., 'decoder': ...}`` (numpy) from ``path`` (see module docstring);
    a converted encoder file gives only ``'encoder'`` unless ``decoder`` names the converted decoder.
    ``what`` names the setting in error messages."""
    if not path:
        raise ConfigError("config.dvae.workdir is empty: train a dVAE first (python -m "
                                "dallejax.train_dvae --workdir=DIR) and set --config.dvae.workdir=DIR, or "
                                "encode the data (python -m dallejax.encode_dataset) and set "
                                "config.data.source='tokens'")
    if not os.path.exists(path):
        raise ConfigError(f"{what}={path!r} does not exist")
    params: dict
    if os.path.isdir(path):
        params, root = read_eval_params(path)
        if params is None:
            raise ConfigError(f"{what}={path!r}: no checkpoint in {root}; train the dVAE "
                              f"first (python -m dallejax.train_dvae --workdir=...)")
    elif path.endswith((".msgpack", ".safetensors")):
        params = _read_weights_file(path)
    else:
        raise ConfigError(f"{what}={path!r}: expected a train_dvae workdir, an orbax step "
                                f"directory, or a .msgpack/.safetensors file")
    if decoder:
        params = {**params, **_read_weights_file(decoder)}
    return jax.tree_util.tree_map(np.asarray, params)


def _read_weights_file(path: str) -> dict:
    from dallejax import convert
    try:
        kind, _, variables = convert.load_params(path)     # written by python -m dallejax.convert
        return {kind: variables["params"]}
    except ValueError:
        if not path.endswith(".msgpack"):
            raise
    from flax import serialization
    with open(path, "rb") as f:
        blob = serialization.msgpack_restore(f.read())
    return blob.get("params", blob)


def _check_dvae_params(model: dvae_lib.DVAE, params: dict, where: str, what: str = "config.dvae.workdir") -> Any:
    """Boxed template of the parts present; raises ConfigError naming the first mismatches."""
    from clipjax.checkpoint import param_shapes
    s = model.image_size
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, model.input_channels))))
    template = {k: v for k, v in template["params"].items() if k in params}
    if "encoder" not in params:
        raise ConfigError(f"{what}={where!r} holds no dVAE encoder (parts: {sorted(params)})")
    want, got = param_shapes(nn.unbox(template)), param_shapes(params)
    if want != got:
        diffs = [f"{k}: weights {got.get(k)} vs config.dvae.model {want.get(k)}"
                 for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        raise ConfigError(f"{what}={where!r} does not fit config.dvae.model ({len(diffs)} "
                          f"differences: {'; '.join(diffs[:4])}); use the dVAE config it was trained with")
    return template


def _boxed_like(values: Any, template: Any) -> Any:
    return jax.tree.map(lambda box, v: box.replace_boxed(jnp.asarray(v)) if isinstance(box, nn.Partitioned)
                        else jnp.asarray(v), template, values, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def encode_images(model: dvae_lib.DVAE, dvae_params: Any, images: jax.Array) -> jax.Array:
    """``images: b h w c`` in [0, 1] -> argmax codes ``b (h' w')`` int32 (no gradient)."""
    tokens = model.apply({"params": dvae_params}, images, method=dvae_lib.DVAE.encode)
    return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], -1))


# ------------------------------------------------------------------------------------- data
def pipeline_data_fn(config):
    """Task.data in pipeline mode: ``{'text': b T int32, 'image': b h w 3 float32 in [0, 1]}``."""
    from clipjax.data import pipeline
    from dallejax.train_dvae import to_unit

    def data(start_step, process_index, process_count):
        for batch in pipeline.make_train_iterator(config, start_step, process_index, process_count):
            yield {"text": batch["tokens"], "image": to_unit(batch["images"])}
    return data


class TokenShards:
    """Random access over ``python -m dallejax.encode_dataset`` shards (see that module for the format).

    ``len(shards)`` records; :meth:`read` -> ``(text: k T int32, image: N int32, label)`` where ``k``
    is the number of captions of the record. ``meta`` is the ``dataset.json`` written next to them.
    """

    def __init__(self, path: str):
        import json
        from clipjax.data.sources import DataError, ShardsSource
        meta_path = os.path.join(path, "dataset.json")
        if not os.path.isdir(path) or not os.path.exists(meta_path):
            raise DataError(f"{path!r} is not a token-shard folder (no dataset.json); create one with "
                            f"python -m dallejax.encode_dataset --config=... --dvae=... --out={path}")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != "dallejax.tokens/1":
            raise DataError(f"{meta_path}: format {self.meta.get('format')!r} is not 'dallejax.tokens/1' "
                            f"(image-caption shards go to config.data.source='shards', not 'tokens')")
        self._records = ShardsSource(path)
        self.text_len, self.grid = int(self.meta["text_len"]), int(self.meta["grid"])
        self.image_dtype = np.dtype(self.meta["image_dtype"]).newbyteorder("<")

    def __len__(self) -> int:
        return len(self._records)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        from tensorflow.core.example import example_pb2
        ex = example_pb2.Example.FromString(self._records.read_record(int(index)))
        f = ex.features.feature
        text = np.frombuffer(f["text_tokens"].bytes_list.value[0], "<i4").reshape(-1, self.text_len)
        image = np.frombuffer(f["image_tokens"].bytes_list.value[0], self.image_dtype).astype(np.int32)
        return text, image, int(f["label"].int64_list.value[0])

    def check(self, config) -> None:
        """Raises ConfigError when the shards do not fit ``config.model``."""
        m = config.model
        for key, meta_key in (("text_len", "text_len"), ("grid", "grid"), ("image_vocab_size", "image_vocab_size")):
            if int(m[key]) != int(self.meta[meta_key]):
                raise ConfigError(f"config.model.{key}={m[key]} but the token shards have {meta_key}="
                                  f"{self.meta[meta_key]}; use the model config the data was encoded for, "
                                  f"or re-encode with python -m dallejax.encode_dataset")


def token_batch_indices(seed: int, step: int, n: int, global_batch: int, rows: np.ndarray) -> np.ndarray:
    """Example indices of ``rows`` (global rows of step ``step``): epoch + keyed permutation per position."""
    from clipjax.data.pipeline import permute
    positions = np.int64(step) * global_batch + rows.astype(np.int64)
    epochs, r = np.divmod(positions, n)
    out = np.empty(len(rows), np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = permute(r[sel], n, (seed, int(e)))
    return out


def token_data_fn(config):
    """Task.data in tokens mode: ``{'text': b T int32, 'image_tokens': b N int32}`` by position."""
    path = config.data.path

    def data(start_step, process_index, process_count) -> Iterator[dict]:
        shards = TokenShards(path)
        global_batch = int(config.batch_size)
        local = global_batch // process_count
        rows = process_index * local + np.arange(local)
        n, seed = len(shards), int(config.seed)
        step = int(start_step)
        while True:
            indices = token_batch_indices(seed, step, n, global_batch, rows)
            choice = np.random.default_rng([seed, 0xCA97, step]).integers(0, 2 ** 31, global_batch)[rows]
            text, image = [], []
            for i, c in zip(indices, choice):
                t, im, _ = shards.read(i)
                text.append(t[c % len(t)])
                image.append(im)
            yield {"text": np.stack(text), "image_tokens": np.stack(image)}
            step += 1
    return data


# ------------------------------------------------------------------------------------- loss
def _cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def example_losses(model: DalleTransformer, params, text, image, text_weight: float) -> dict:
    """Per-example ``loss``, ``text_loss``, ``image_loss``, ``image_accuracy`` (each ``b``).

    With ``text_weight == 0`` the text head is never evaluated (XLA drops the unused logits),
    which saves the ``b (T-1) d (V + T)`` text-head product (49k classes with CLIP's BPE)."""
    text_logits, image_logits = model.apply({"params": params}, text, image)
    image_ce = _cross_entropy(image_logits, image).mean(-1)
    out = {"image_loss": image_ce, "image_accuracy": jnp.mean(jnp.argmax(image_logits, -1) == image, -1)}
    if text_weight > 0:
        targets = remap_text_padding(text.astype(jnp.int32), model.config)[:, 1:]
        out["text_loss"] = _cross_entropy(text_logits, targets).mean(-1)
        out["loss"] = text_weight * out["text_loss"] + (1.0 - text_weight) * image_ce
    else:
        out["loss"] = image_ce
    return out


def drop_captions(rng, text: jax.Array, null_text: jax.Array, p: float) -> jax.Array:
    """Replaces each caption row by ``null_text`` with probability ``p`` (deterministic in ``rng``)."""
    if p <= 0:
        return text
    drop = jax.random.bernoulli(jax.random.fold_in(rng, _DROPOUT_TAG), p, (text.shape[0],))
    return jnp.where(drop[:, None], null_text[None].astype(text.dtype), text)


# ------------------------------------------------------------------------------------- task
def _check_config(config, model: DalleTransformer, dvae: Optional[dvae_lib.DVAE], tokens_mode: bool):
    cfg = model.config
    p = float(config.get("text_dropout", 0.0))
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"config.text_dropout={p}: must be in [0, 1)")
    tw = float(config.loss.text_weight)
    if not 0.0 <= tw <= 1.0:
        raise ConfigError(f"config.loss.text_weight={tw}: must be in [0, 1] (paper: 0.125)")
    if dvae is not None:
        if dvae.token_grid != cfg.grid or dvae.vocab_size != cfg.image_vocab_size:
            raise ConfigError(f"config.dvae.model makes a {dvae.token_grid}x{dvae.token_grid} grid of "
                              f"{dvae.vocab_size} codes but config.model has grid={cfg.grid}, image_vocab_size="
                              f"{cfg.image_vocab_size}; make them agree")
    if tokens_mode:
        if not config.data.get("path"):
            raise ConfigError("config.data.source='tokens' needs config.data.path (a folder written by "
                              "python -m dallejax.encode_dataset)")
        return
    if dvae is not None and int(config.data.image_size) != dvae.image_size:
        raise ConfigError(f"config.data.image_size={config.data.image_size} but the dVAE takes "
                          f"{dvae.image_size} px (config.dvae.model.image_size); make them equal")
    if int(config.data.context_length) != cfg.text_len:
        raise ConfigError(f"config.data.context_length={config.data.context_length} but config.model.text_len="
                          f"{cfg.text_len}; make them equal")
    tok = _tokenizer(cfg.text_len)
    if tok.vocab_size > cfg.text_vocab_size or tok.eot_token_id != cfg.end_of_text:
        raise ConfigError(f"config.model.text_vocab_size={cfg.text_vocab_size} (end of text id {cfg.end_of_text}) "
                          f"does not fit the CLIP tokenizer ({tok.vocab_size} ids, end of text "
                          f"{tok.eot_token_id}); set config.model.text_vocab_size={tok.vocab_size} and eot_id=-1")


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from clipjax.tokenizer import Tokenizer
    return Tokenizer(context_length=context_length)


def _estimate_flops(model: DalleTransformer, dvae: Optional[dvae_lib.DVAE], encode: bool,
                    with_text_head: bool = True) -> float:
    """Training FLOPs per example: 3x the transformer's forward + the dVAE encoder's forward."""
    cfg = model.config
    try:
        def fwd(params, text, image):
            text_logits, image_logits = model.apply({"params": params}, text, image)
            return (text_logits, image_logits) if with_text_head else image_logits
        shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.text_len),
                                                            jnp.int32), jnp.zeros((1, cfg.image_len), jnp.int32))))
        cost = jax.jit(fwd).lower(shapes["params"], jax.ShapeDtypeStruct((1, cfg.text_len), jnp.int32),
                                  jax.ShapeDtypeStruct((1, cfg.image_len), jnp.int32)).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        total = 3.0 * float(cost.get("flops", 0.0))
        if encode and dvae is not None:
            s = dvae.image_size
            enc_shapes = jax.eval_shape(lambda: nn.unbox(dvae.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))))
            ec = jax.jit(lambda p, x: dvae.apply({"params": p}, x, method=dvae_lib.DVAE.encode)).lower(
                enc_shapes["params"], jax.ShapeDtypeStruct((1, s, s, dvae.input_channels), jnp.float32)).cost_analysis()
            ec = ec[0] if isinstance(ec, (list, tuple)) else ec
            total += float(ec.get("flops", 0.0))
        return total
    except Exception as e:  # best effort: MFU is omitted
        logging.warning("could not estimate FLOPs: %s", e)
        return 0.0


def dalle_task(config: ml_collections.ConfigDict) -> Task:
    """The DALL-E transformer task (see module docstring)."""
    try:
        model = model_from_config(config.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    cfg = model.config
    tokens_mode = config.data.source == TOKENS_SOURCE
    dvae_cfg = config.get("dvae", None)
    dvae_path = dvae_cfg.get("workdir", "") if dvae_cfg is not None else ""
    if not tokens_mode and not dvae_path:
        load_dvae_params("")  # raises the explanatory error
    dvae = dvae_model(dvae_cfg) if (dvae_path or not tokens_mode) else None
    _check_config(config, model, dvae, tokens_mode)
    if tokens_mode:
        from clipjax.data.sources import DataError
        try:
            TokenShards(config.data.path).check(config)
        except DataError as e:
            raise ConfigError(f"config.data.path: {e}") from None
    text_weight = float(config.loss.text_weight)
    p_drop = float(config.get("text_dropout", 0.0))
    null_text = jnp.asarray(sampling.empty_caption(cfg)[0])
    ecfg = config.get("eval", eval_config())

    dvae_params = dvae_template = None
    if dvae is not None:
        dvae_params = load_dvae_params(dvae_path, dvae_cfg.get("decoder", ""))
        dvae_template = _check_dvae_params(dvae, dvae_params, dvae_path)

    def init(rng):
        variables = dict(model.init(rng, jnp.zeros((1, cfg.text_len), jnp.int32),
                                    jnp.zeros((1, cfg.image_len), jnp.int32)))
        if dvae_params is not None:
            variables["dvae"] = _boxed_like(dvae_params, dvae_template)
        return variables

    def loss(params, model_state, batch, rng, step):
        if "image_tokens" in batch:
            image = batch["image_tokens"].astype(jnp.int32)
        else:
            image = encode_images(dvae, model_state["dvae"], batch["image"])
        text = drop_captions(rng, batch["text"].astype(jnp.int32), null_text, p_drop)
        per = example_losses(model, params, text, image, text_weight)
        metrics = {k: jnp.mean(v) for k, v in per.items()}
        return metrics["loss"], metrics, model_state

    evaluators = {}
    if ecfg.get("heldout", True):
        evaluators["heldout"] = _heldout_evaluator(config, model, dvae, text_weight, tokens_mode, ecfg)
    if tuple(ecfg.get("prompts", ())) and dvae is not None:
        evaluators["samples"] = _samples_evaluator(config, model, dvae, ecfg)

    data = token_data_fn(config) if tokens_mode else pipeline_data_fn(config)
    name = f"dalle:{cfg.text_len}+{cfg.grid}x{cfg.grid}/{cfg.image_vocab_size}"
    # Without the text loss the text head gets no gradient: freezing it also skips its optimizer update.
    frozen = ("text_head",) if text_weight == 0 else ()
    return Task(name=name, init=init, loss=loss, data=data, evaluators=evaluators, frozen=frozen,
                flops_per_example=_estimate_flops(model, dvae, not tokens_mode, text_weight > 0)
                if config.get("count_flops", True) else 0.0)


# ------------------------------------------------------------------------------------- evaluators
def load_heldout(config, max_examples: int) -> dict:
    """Held-out examples (first caption): ``text: n T``, ``labels: n`` and ``image: n h w 3`` in [0, 1]
    (pipeline mode, CLIP eval transform) or ``image_tokens: n N`` (tokens mode, ``config.data.eval_path``)."""
    if config.data.source == TOKENS_SOURCE:
        path = config.data.get("eval_path", "")
        if not path:
            return {}
        shards = TokenShards(path)
        n = len(shards) if not max_examples else min(max_examples, len(shards))
        rows = [shards.read(i) for i in range(n)]
        return {"text": np.stack([r[0][0] for r in rows]), "image_tokens": np.stack([r[1] for r in rows]),
                "labels": np.array([r[2] for r in rows], np.int32)}
    from clipjax.data import pipeline
    from clipjax.train import _Subset
    from dallejax.train_dvae import to_unit
    source = _Subset(pipeline.make_source(config.data, "eval"), max_examples)
    parts: dict = {"image": [], "text": [], "labels": []}
    for batch in pipeline.make_eval_iterator(config, batch_size=min(256, len(source)), source=source):
        m = np.asarray(batch["mask"])
        parts["image"].append(to_unit(batch["images"])[m])
        parts["text"].append(np.asarray(batch["tokens"])[m])
        parts["labels"].append(np.asarray(batch["labels"])[m])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _heldout_evaluator(config, model, dvae, text_weight, tokens_mode, ecfg):
    @functools.lru_cache(maxsize=1)
    def examples():
        return load_heldout(config, int(ecfg.get("num_images", 0)))

    @jax.jit
    def eval_step(params, model_state, batch):
        image = batch["image_tokens"] if "image_tokens" in batch else encode_images(dvae, model_state["dvae"],
                                                                                    batch["image"])
        per = example_losses(model, params, batch["text"], image, text_weight)
        return {k: jnp.sum(v * batch["mask"]) for k, v in per.items()}

    def evaluate(params, model_state, step):
        data = examples()
        if not data:
            return {}
        keys = [k for k in ("text", "image", "image_tokens") if k in data]
        n = len(data["text"])
        bs = min(int(ecfg.get("batch_size", 128)), n)
        sums: dict = {}
        for start in range(0, n, bs):
            chunk = {k: data[k][start:start + bs] for k in keys}
            valid = len(chunk["text"])
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], bs - valid, 0)]) for k, v in chunk.items()}
            chunk["mask"] = (np.arange(bs) < valid).astype(np.float32)
            out = eval_step(params, model_state, chunk)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / n for k, v in sums.items()}
    return evaluate


def _samples_evaluator(config, model, dvae, ecfg):
    prompts = [str(p) for p in ecfg.prompts]
    k = int(ecfg.get("samples_per_prompt", 4))
    tokens = np.asarray(_tokenizer(model.config.text_len)(prompts))
    sc = config.get("sampling", ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0,
                                                                 guidance_scale=1.0)))
    decode = jax.jit(lambda p, t: dvae.apply({"params": p}, t, method=dvae_lib.DVAE.decode))
    g = model.config.grid

    def evaluate(params, model_state, step):
        dv = model_state.get("dvae", {}) if model_state else {}
        if "decoder" not in dv:
            return {}
        codes = sampling.sample(model, params, tokens, jax.random.PRNGKey(int(config.seed)), num_samples=k,
                                temperature=float(sc.temperature), top_k=int(sc.top_k), top_p=float(sc.top_p),
                                guidance_scale=float(sc.guidance_scale))
        workdir = config.get("workdir_for_images", "")
        if workdir and jax.process_index() == 0:
            from dallejax.images import save_grid
            images = np.asarray(decode(dv, codes.reshape(-1, g, g)))
            save_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), images, cols=k * 2)
        codes = np.asarray(codes)
        return {"code_usage": float(len(np.unique(codes)) / model.config.image_vocab_size)}
    return evaluate


# ------------------------------------------------------------------------------------- CLI
def train_main(config, workdir: str) -> int:
    from clipjax import cli
    with config.unlocked():
        config.workdir_for_images = workdir
    return cli.train_main(config, workdir)


def run():
    from clipjax import cli
    cli.run_main(train_main)


if __name__ == "__main__":
    run()
