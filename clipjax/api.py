"""High-level entry points: load a CLIP model with its preprocessing and tokenizer; zero-shot heads.

::

    model, variables, preprocess, tokenizer = load("ViT-B-32", "ViT-B-32.pt")
    images = np.stack([preprocess(img) for img in pil_images])            # b h w 3
    img = model.apply(variables, images, normalize=True, method=model.encode_image)
    head = zero_shot_classifier(model, variables, tokenizer, ["cat", "dog"], ["a photo of a {}."])
    probs = jax.nn.softmax(100.0 * img @ head)                             # b classes

There is no download: ``weights`` is a local file (clipjax ``.msgpack``, open_clip/OpenAI
``.pt``/``.pth``/``.bin``/``.safetensors``) or None for a random initialisation.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import convert
from clipjax.models.clip import CLIP
from clipjax.models.layers import stack_layers
from clipjax.models.registry import create_model, get_model_config


def _preprocess_fn(image_size: int) -> Callable:
    from clipjax.preprocess import preprocess_image
    return functools.partial(preprocess_image, image_size=image_size)


def _tokenizer(context_length: int):
    from clipjax.tokenizer import Tokenizer
    return Tokenizer(context_length=context_length)


def load(name: Optional[str] = None, weights: Optional[Union[str, os.PathLike]] = None, *,
         dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, scan: bool = False, seed: int = 0,
         **overrides: Any):
    """Returns ``(model, variables, preprocess_fn, tokenizer)``.

    Args:
      name: a registry name (``clipjax.models.list_models()``). May be omitted when ``weights`` is given:
        the architecture then comes from the file (stored config, or inferred from the state dict).
      weights: None (random init from ``seed``), a clipjax ``.msgpack`` or an open_clip/OpenAI checkpoint.
      dtype, param_dtype, scan, overrides: passed to :func:`clipjax.models.create_model`.

    ``preprocess_fn(pil_or_array) -> h w 3`` float32 normalised image; ``tokenizer(texts) -> b l`` int32.
    """
    module_kw = dict(dtype=dtype, param_dtype=param_dtype, scan=scan)
    if name is None and weights is None:
        raise ValueError("load() needs a model name, a weights file, or both.")
    variables = None
    if weights is None:
        model = create_model(name, **module_kw, **overrides)
    else:
        weights = os.fspath(weights)
        if weights.endswith(".msgpack"):
            config, variables, stored = convert.load_clipjax(weights)
            if name is not None and not overrides and get_model_config(name) != config:
                raise ValueError(f"{weights!r} holds a {stored or 'custom'} model whose config differs from "
                                 f"{name!r}; call load(None, {weights!r}) to use the stored config.")
            model = CLIP(config, **module_kw)
            variables = stack_layers(variables) if scan else variables
        else:
            sd = convert.read_checkpoint(weights)
            if name is not None:
                model = create_model(name, **module_kw, **overrides)
            else:
                # OpenAI's TorchScript release used QuickGELU; plain state dicts do not say.
                config = convert.infer_config(sd, quick_gelu=convert._is_torchscript(weights))
                model = CLIP(config, **module_kw)
            variables = convert.torch_to_clipjax(sd, model)
    cfg = model.config
    if variables is None:
        s = cfg.vision.image_size
        init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32),
                                              jnp.zeros((1, cfg.text.context_length), jnp.int32)))
        import flax.linen as nn
        # 'rbg' keys: same determinism, ~3x faster to compile than threefry for a whole-model init.
        variables = nn.meta.unbox(init(jax.random.key(seed, impl="rbg")))
    variables = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, param_dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a),
        variables)
    return model, variables, _preprocess_fn(cfg.vision.image_size), _tokenizer(cfg.text.context_length)


def zero_shot_classifier(model: CLIP, variables: Any, tokenizer: Callable, classnames: Sequence[str],
                         templates: Sequence[Union[str, Callable[[str], str]]], batch_size: int = 256) -> jax.Array:
    """Zero-shot head ``embed classes``: per class, the normalised mean of the normalised text
    embeddings of every template (``"a photo of a {}."`` or a callable ``c -> str``), renormalised."""
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template.")
    texts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]
    tokens = np.asarray(tokenizer(texts))
    encode = jax.jit(lambda v, tok: model.apply(v, tok, normalize=True, method=CLIP.encode_text))
    feats = []
    for i in range(0, len(tokens), batch_size):
        chunk = tokens[i:i + batch_size]
        pad = batch_size - len(chunk) if len(tokens) > batch_size else 0  # one compiled shape
        out = encode(variables, np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk)
        feats.append(out[:len(chunk)])
    emb = jnp.concatenate(feats).reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    return emb.T
