"""The model side of search: load a CLIP (registry name + weights file, or a training run's
checkpoint) and embed images / texts with it, batched and jitted, data-parallel over local devices.

A model is described by a small JSON-able *spec* stored in the index (``index.json: model``) so
that ``query`` can reload the exact model that built the index::

    {"kind": "weights", "name": "ViT-B-32" | null, "weights": "/abs/file.pt" | null, "seed": 0}
    {"kind": "workdir", "config": "/abs/config.py", "workdir": "/abs/run", "step": 600,
     "name": "tiny-vit", "weights": "INDEX_DIR/model.msgpack"}  # the checkpoint's params

A ``workdir`` checkpoint is saved into the index folder as a clipjax ``.msgpack`` (small for the
models one trains here; it makes the index self-contained: a later ``query`` needs no config).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class SearchError(ValueError):
    """A user error (bad flags, inconsistent index, bad query). The message names the fix."""
    user_error = True


@dataclasses.dataclass(eq=False)
class Encoder:
    """A loaded CLIP with its preprocessing and tokenizer (see :func:`load_encoder`)."""
    model: Any
    variables: Any
    preprocess: Callable[[Any], np.ndarray]
    tokenizer: Callable[[Sequence[str]], np.ndarray]
    spec: dict

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision.image_size)

    @property
    def dim(self) -> int:
        return int(self.model.config.embed_dim)

    @functools.cached_property
    def _image_fn(self):
        from clipjax.models.clip import CLIP
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices), ("batch",))
        rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        fn = jax.jit(lambda v, x: self.model.apply(v, x, normalize=True, method=CLIP.encode_image),
                     in_shardings=(rep, split), out_shardings=rep)
        return fn, len(devices), rep

    def embed_preprocessed(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``images: n h w 3`` (already preprocessed) -> ``n e`` L2-normalised float32.

        Batches have a fixed size (rounded up to a multiple of the local device count, the last
        one padded) and are split over the local devices, so the encoder compiles once.
        """
        fn, ndev, rep = self._image_fn
        if not hasattr(self, "_placed"):
            self._placed = jax.device_put(self.variables, rep)
        n = len(images)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        bs = -(-batch_size // ndev) * ndev
        out = []
        for i in range(0, n, bs):
            chunk = np.asarray(images[i:i + bs], np.float32)
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(fn(self._placed, chunk))[:bs - pad])
        return np.concatenate(out)

    def save_model(self, path: str) -> None:
        """Writes the model as a clipjax ``.msgpack`` (loadable with ``clipjax.api.load(None, path)``)."""
        from clipjax import convert
        convert.save_clipjax(path, self.variables, self.model.config, model_name=self.spec.get("name") or "")

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``texts`` -> ``n e`` L2-normalised float32."""
        from clipjax.evals.embed import embed_texts
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise SearchError(f"text queries must be non-empty strings; got {texts!r}")
        return embed_texts(self.model, self.variables, np.asarray(self.tokenizer(texts)), batch_size)

    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Image paths, PIL images or ``h w 3`` uint8 arrays (raw, not preprocessed) -> ``n e``."""
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        arrays = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                im = open_image_file(os.fspath(im))
            elif isinstance(im, np.ndarray) and (im.ndim != 3 or im.shape[-1] != 3):
                raise SearchError(f"an image query array must be h w 3 (RGB, uint8); got shape {im.shape}")
            arrays.append(self.preprocess(im))
        return self.embed_preprocessed(np.stack(arrays), batch_size)


def open_image_file(path: str):
    """Reads and validates an image with the shards CLI's checks -> PIL RGB; SearchError if bad."""
    from clipjax.data.sources import SkipExample, load_image
    try:
        with open(path, "rb") as f:
            data = f.read()
        return load_image(data)[0]
    except FileNotFoundError:
        raise SearchError(f"image query {path!r}: no such file") from None
    except SkipExample as e:
        raise SearchError(f"image query {path!r} is unusable ({e}); pass a readable JPEG/PNG") from None


def decode_image_bytes(data: bytes):
    from clipjax.data.sources import load_image
    return load_image(data)[0]


def load_encoder(*, model: Optional[str] = None, weights: Optional[str] = None, config=None,
                 workdir: Optional[str] = None, step: Optional[int] = None,
                 spec: Optional[dict] = None, config_file: Optional[str] = None) -> Encoder:
    """Loads the model an index is built or queried with.

    Either ``model``/``weights`` (a registry name and/or a weights file: clipjax ``.msgpack``,
    open_clip/OpenAI ``.pt``/``.bin``/``.safetensors``; a name alone = random init, for tests), or
    ``config`` (a config file path or ConfigDict; ``config_file`` names the file for the record)
    + ``workdir`` (+ ``step``, default latest) of a ``clipjax.train`` run (the index builder saves
    its params into the index folder); or a ``spec`` stored in an index.
    """
    from clipjax import api
    if spec is not None:
        if spec.get("kind") == "none":
            raise SearchError("this index holds precomputed embeddings with no model recorded: query it with "
                              "embeddings, or pass the model (Index.open(dir, encoder=load_encoder(...)) / "
                              "--weights, --model or --config/--workdir)")
        if spec.get("kind") not in ("weights", "workdir"):
            raise SearchError(f"index.json has an unknown model spec {spec!r}; rebuild the index")
        w = spec.get("weights")
        if w and not os.path.exists(w):
            raise SearchError(f"the index's model weights {w!r} are missing; pass --weights/--model "
                              f"(or --config/--workdir) explicitly")
        name = spec.get("name") if spec["kind"] == "weights" else None
        m, v, pre, tok = api.load(name if not (w or "").endswith(".msgpack") else None, w,
                                  seed=int(spec.get("seed", 0)))
        return Encoder(m, v, pre, tok, dict(spec))
    if config is not None or workdir:
        if config is None or not workdir:
            raise SearchError("a training run needs both --config (the run's config file) and --workdir")
        if model or weights:
            raise SearchError("pass either --config/--workdir or --model/--weights, not both")
        return _from_workdir(config, workdir, step, config_file)
    if not model and not weights:
        raise SearchError("no model: pass --weights FILE (and --model NAME for .pt/.bin files), "
                          "or --config CONFIG.py --workdir RUN_DIR to use a training checkpoint")
    if weights and not os.path.exists(weights):
        raise SearchError(f"--weights {weights!r}: no such file")
    wpath = os.path.abspath(weights) if weights else None
    try:
        m, v, pre, tok = api.load(None if (wpath or "").endswith(".msgpack") and not model else model, wpath)
    except ValueError as e:
        raise SearchError(str(e)) from None
    return Encoder(m, v, pre, tok, {"kind": "weights", "name": model or None, "weights": wpath, "seed": 0})


def _from_workdir(config, workdir: str, step: Optional[int], config_file: Optional[str]) -> Encoder:
    import ml_collections
    from clipjax import api, convert, trainer
    from clipjax.train import build_model
    config_file = os.path.abspath(config_file) if config_file else None
    if isinstance(config, (str, os.PathLike)):
        config_file = os.path.abspath(os.fspath(config))
        config = _load_config_file(config_file)
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.count_flops = False  # not needed to read a checkpoint
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise SearchError(f"--workdir {workdir!r} has no checkpoints/ folder; train first "
                          f"(python -m clipjax.train --config=... --workdir={workdir})")
    state = trainer.restore_state(config, workdir, step=step)
    step = int(jax.device_get(state.step))
    model = build_model(config.model)
    variables = {"params": state.eval_params(), **(state.model_state or {})}
    variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    # Round-trip through the clipjax file format, so the model that builds an index is exactly
    # the one a later query loads from INDEX_DIR/model.msgpack (unscanned, float32).
    import tempfile
    with tempfile.TemporaryDirectory(prefix="clipjax_search_") as tmp:
        path = os.path.join(tmp, "model.msgpack")
        convert.save_clipjax(path, variables, model.config, model_name=config.model.name)
        m, v, pre, tok = api.load(None, path)
    spec = {"kind": "workdir", "config": config_file, "workdir": os.path.abspath(workdir), "step": step,
            "name": config.model.name, "weights": None}  # set when an index stores the model
    return Encoder(m, v, pre, tok, spec)


def _load_config_file(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_search_config", path)
    if spec is None or not os.path.exists(path):
        raise SearchError(f"--config {path!r}: no such config file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def thumbnail_png(image, size: int = 128) -> bytes:
    """A PNG thumbnail (longest side ``size``) of a PIL image."""
    img = image.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
