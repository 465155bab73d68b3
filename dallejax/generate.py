"""Text-to-image generation CLI: sample image tokens, decode them with the dVAE, rerank with CLIP.

::

    python -m dallejax.generate --config=configs/dalle/tiny.py --checkpoint=dalle.msgpack \\
        --dvae-checkpoint=dvae.msgpack --prompt="a red square" --num=16 \\
        --rerank-with=clip.msgpack --keep=4 --out=grid.png

    # image completion: keep the top R token rows of an image, sample the rest
    ... --complete=photo.png --keep-rows=2
    # editing: resample the token cells covering a pixel box (see dallejax.sampling on raster order)
    ... --edit=photo.png --box=0,0,4,8

Checkpoints (``--checkpoint``, ``--dvae-checkpoint``) are either a trainer workdir (its latest
orbax checkpoint under ``checkpoints/``; EMA parameters when present), a checkpoint directory
itself, or a ``.msgpack`` file written by :func:`save_variables`. ``random`` initialises random
weights from ``--seed`` (only useful to smoke-test the pipeline). ``--rerank-with`` takes what
``clipjax.api.load`` takes (clipjax ``.msgpack``, open_clip/OpenAI checkpoints; ``--clip-model``
names the architecture when the file does not carry it; ``random`` with ``--clip-model`` uses random
CLIP weights, again only for smoke tests).

``--box`` is in pixels of the dVAE-sized image (``config.dvae.image_size``, the input is resized
and centre-cropped to it); every token cell that the box touches is resampled.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from clipjax.checkpoint import read_eval_params
from dallejax import sampling
from dallejax.images import make_grid, save_grid  # noqa: F401  (re-exported)
from dallejax.transformer import DalleTransformer, model_from_config

__all__ = ["GenerateError", "load_variables", "save_variables", "load_image", "make_grid", "save_grid",
           "pixel_box_to_tokens", "generate"]

# Flag holders, set by _define_flags() when the CLI runs.
_CHECKPOINT = _DVAE_CHECKPOINT = _PROMPT = _NUM = _BATCH = _SEED = _TEMPERATURE = _TOP_K = _TOP_P = _GUIDANCE = _RERANK = _CLIP_MODEL = _KEEP = _COMPLETE = _KEEP_ROWS = _EDIT = _BOX = _OUT = _COLS = None


def _define_flags():
    """Defined when the CLI runs, not at import: absl flags are global and other CLIs share names."""
    global _CHECKPOINT, _DVAE_CHECKPOINT, _PROMPT, _NUM, _BATCH, _SEED, _TEMPERATURE, _TOP_K, _TOP_P, _GUIDANCE, _RERANK, _CLIP_MODEL, _KEEP, _COMPLETE, _KEEP_ROWS, _EDIT, _BOX, _OUT, _COLS
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "DALL-E transformer weights: workdir, orbax step dir, "
                                      ".msgpack, or 'random'.")
    _DVAE_CHECKPOINT = flags.DEFINE_string("dvae-checkpoint", None, "dVAE weights (same formats) or 'random'.")
    _PROMPT = flags.DEFINE_string("prompt", None, "The caption.")
    _NUM = flags.DEFINE_integer("num", 16, "Number of images to sample.")
    _BATCH = flags.DEFINE_integer("batch", 0, "Samples per compiled sampling call (0 = config.sampling.batch).")
    _SEED = flags.DEFINE_integer("seed", 0, "Random seed (sampling and any random init).")
    _TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy).")
    _TOP_K = flags.DEFINE_integer("top-k", None, "Keep the k most likely tokens (0 = off).")
    _TOP_P = flags.DEFINE_float("top-p", None, "Nucleus sampling mass (1 = off).")
    _GUIDANCE = flags.DEFINE_float("guidance-scale", None, "Classifier-free guidance scale (1 = off).")
    _RERANK = flags.DEFINE_string("rerank-with", "", "CLIP weights used to rerank the samples (empty = no rerank).")
    _CLIP_MODEL = flags.DEFINE_string("clip-model", None, "CLIP architecture name for --rerank-with.")
    _KEEP = flags.DEFINE_integer("keep", 0, "With --rerank-with: keep the best k images (0 = all, sorted).")
    _COMPLETE = flags.DEFINE_string("complete", "", "Image to complete from its top --keep-rows token rows.")
    _KEEP_ROWS = flags.DEFINE_integer("keep-rows", 0, "Token rows kept with --complete.")
    _EDIT = flags.DEFINE_string("edit", "", "Image whose --box region is resampled.")
    _BOX = flags.DEFINE_string("box", "", "x0,y0,x1,y1 in pixels of the dVAE-sized image (with --edit).")
    _OUT = flags.DEFINE_string("out", "grid.png", "Output PNG grid.")
    _COLS = flags.DEFINE_integer("cols", 0, "Grid columns (0 = about square).")


class GenerateError(ValueError):
    """A user error: the CLI prints it as one line."""
    user_error = True


# ----------------------------------------------------------------------------- weights


def load_variables(path: str) -> Any:
    """Parameters (a plain nested dict) from a trainer workdir / orbax step dir / ``.msgpack`` file."""
    if not os.path.exists(path):
        raise GenerateError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        params, root = read_eval_params(path)
        if params is None:
            raise GenerateError(f"no checkpoint found in {root}; pass a trainer workdir, a step directory or "
                                "a .msgpack file")
    elif path.endswith(".msgpack"):
        from flax import serialization
        with open(path, "rb") as f:
            blob = serialization.msgpack_restore(f.read())
        params = blob.get("params", blob) if isinstance(blob, dict) else blob
    else:
        raise GenerateError(f"checkpoint {path!r}: expected a trainer workdir, an orbax step directory or a "
                            ".msgpack file")
    return jax.tree_util.tree_map(jnp.asarray, params)


def save_variables(path: str, params: Any) -> None:
    """Writes ``{'params': params}`` as msgpack (readable by :func:`load_variables`)."""
    import flax.linen as nn
    from flax import serialization
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({"params": params}))


def _init_or_load(path: Optional[str], init_fn, seed: int, what: str):
    if not path:
        raise GenerateError(f"--{what} is required (a checkpoint, or 'random' for random weights)")
    if path == "random":
        import flax.linen as nn
        return nn.meta.unbox(jax.jit(init_fn)(jax.random.PRNGKey(seed))["params"])
    return load_variables(path)


def _check_params(params, init_fn, what: str):
    """Compares the loaded tree with the model's (shapes from eval_shape) and names the first mismatches."""
    import flax.linen as nn
    from clipjax.checkpoint import param_shapes
    want = param_shapes(nn.meta.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0))["params"]))
    got = param_shapes(params)
    if want != got:
        diffs = [f"{k}: checkpoint {got.get(k)} vs model {want.get(k)}" for k in sorted(set(want) | set(got))
                 if want.get(k) != got.get(k)]
        raise GenerateError(f"{what} does not fit the configured model ({len(diffs)} differences: "
                            f"{'; '.join(diffs[:5])}); check --config against the checkpoint")


# ----------------------------------------------------------------------------- images
def load_image(path: str, size: int) -> np.ndarray:
    """An image file -> ``size size 3`` float32 in [0, 1] (short side resized bicubic, centre crop)."""
    from PIL import Image
    if not os.path.exists(path):
        raise GenerateError(f"image {path!r} does not exist")
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, np.float32) / 255.0


def pixel_box_to_tokens(box: Sequence[int], image_size: int, grid: int) -> tuple[int, int, int, int]:
    """Pixel box ``x0,y0,x1,y1`` (half-open) -> the token cells it touches (half-open)."""
    if len(box) != 4:
        raise GenerateError(f"--box needs four integers x0,y0,x1,y1, got {box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        raise GenerateError(f"--box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {image_size} and "
                            f"0 <= y0 < y1 <= {image_size} (pixels of the dVAE-sized image)")
    cell = image_size / grid
    return (int(x0 // cell), int(y0 // cell), int(math.ceil(x1 / cell)), int(math.ceil(y1 / cell)))


# ----------------------------------------------------------------------------- pipeline
def generate(model: DalleTransformer, params: Any, dvae, dvae_params: Any, text: np.ndarray, *, num: int,
             batch: int, seed: int, fixed_tokens=None, fixed_mask=None, **sample_kwargs) -> np.ndarray:
    """Samples ``num`` token grids for one caption (``text: T``) in chunks of ``batch`` and decodes them:
    returns ``num h w 3`` float32 images in [0, 1]. Chunk ``c`` uses seed ``fold_in(seed, c)``."""
    from dallejax.dvae import DVAE
    grid = model.config.grid
    decode = jax.jit(lambda p, t: dvae.apply({"params": p}, t, method=DVAE.decode))
    out = []
    for c, start in enumerate(range(0, num, batch)):
        k = min(batch, num - start)
        tokens = sampling.sample(model, params, text[None], jax.random.fold_in(jax.random.PRNGKey(seed), c),
                                 num_samples=k, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask,
                                 **sample_kwargs)
        out.append(np.asarray(decode(dvae_params, tokens.reshape(k, grid, grid))))
    return np.concatenate(out)


def _main(config, workdir: str) -> int:
    del workdir
    from dallejax.dvae import DVAE, model_from_config as dvae_from_config

    if not _PROMPT.value and not (_COMPLETE.value or _EDIT.value):
        raise GenerateError("--prompt is required")
    if _COMPLETE.value and _EDIT.value:
        raise GenerateError("use either --complete or --edit, not both")
    if _NUM.value < 1:
        raise GenerateError(f"--num must be >= 1, got {_NUM.value}")
    model = model_from_config(config.model)
    cfg = model.config
    dvae = dvae_from_config(dict(config.dvae))
    if dvae.token_grid != cfg.grid or dvae.vocab_size != cfg.image_vocab_size:
        raise GenerateError(f"config.dvae makes a {dvae.token_grid}x{dvae.token_grid} grid of {dvae.vocab_size} "
                            f"codes but config.model expects grid={cfg.grid}, image_vocab_size="
                            f"{cfg.image_vocab_size}; make them agree")

    from clipjax.tokenizer import Tokenizer
    tokenizer = Tokenizer(context_length=cfg.text_len)
    if tokenizer.vocab_size > cfg.text_vocab_size:
        raise GenerateError(f"the CLIP tokenizer has {tokenizer.vocab_size} ids but config.model.text_vocab_size="
                            f"{cfg.text_vocab_size}; set --config.model.text_vocab_size={tokenizer.vocab_size}")
    text = np.asarray(tokenizer(_PROMPT.value or ""))[0]

    t, n = cfg.text_len, cfg.image_len
    init_dalle = lambda rng: model.init(rng, jnp.zeros((1, t), jnp.int32), jnp.zeros((1, n), jnp.int32))  # noqa
    s = dvae.image_size
    init_dvae = lambda rng: dvae.init(rng, jnp.zeros((1, s, s, dvae.input_channels), jnp.float32))  # noqa
    params = _init_or_load(_CHECKPOINT.value, init_dalle, _SEED.value, "checkpoint")
    dvae_params = _init_or_load(_DVAE_CHECKPOINT.value, init_dvae, _SEED.value + 1, "dvae-checkpoint")
    if model.scan and "layers" not in params.get("transformer", {}):
        from clipjax.models.layers import stack_layers
        params = stack_layers(params)
    _check_params(params, init_dalle, "--checkpoint")
    _check_params(dvae_params, init_dvae, "--dvae-checkpoint")

    fixed_tokens = fixed_mask = None
    source = _COMPLETE.value or _EDIT.value
    if source:
        image = load_image(source, s)[None]
        fixed_tokens = np.asarray(dvae.apply({"params": dvae_params}, jnp.asarray(image), method=DVAE.encode))
        if _COMPLETE.value:
            fixed_mask = sampling.completion_mask(cfg.grid, _KEEP_ROWS.value)
        else:
            try:
                box = [int(v) for v in _BOX.value.split(",")]
            except ValueError:
                raise GenerateError(f"--box must be four integers x0,y0,x1,y1, got {_BOX.value!r}") from None
            fixed_mask = sampling.box_mask(cfg.grid, pixel_box_to_tokens(box, s, cfg.grid))

    sc = config.sampling
    pick = lambda flag, key: sc[key] if flag.value is None else flag.value  # noqa: E731
    images = generate(model, params, dvae, dvae_params, text, num=_NUM.value, batch=_BATCH.value or sc.batch,
                      seed=_SEED.value, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask,
                      temperature=pick(_TEMPERATURE, "temperature"), top_k=pick(_TOP_K, "top_k"),
                      top_p=pick(_TOP_P, "top_p"), guidance_scale=pick(_GUIDANCE, "guidance_scale"),
                      null_text=tokenizer("") if pick(_GUIDANCE, "guidance_scale") != 1.0 else None)
    if _RERANK.value:
        from clipjax.api import load as load_clip
        from dallejax.rerank import rerank
        weights = None if _RERANK.value == "random" else _RERANK.value
        if weights is None and not _CLIP_MODEL.value:
            raise GenerateError("--rerank-with=random needs --clip-model (e.g. tiny-vit)")
        if weights is not None and not os.path.exists(weights):
            raise GenerateError(f"--rerank-with {weights!r} does not exist")
        clip, clip_vars, _, clip_tok = load_clip(_CLIP_MODEL.value, weights, seed=_SEED.value)
        order, scores = rerank(clip, clip_vars, images, clip_tok(_PROMPT.value or ""), _KEEP.value or len(images))
        images = images[order]
        print("clip scores:", " ".join(f"{v:.4f}" for v in scores))
    save_grid(_OUT.value, images, _COLS.value)
    print(f"wrote {len(images)} images to {_OUT.value}")
    return 0


def main():
    from clipjax.cli import run_main
    _define_flags()
    run_main(_main)


run = main  # console script entry point


if __name__ == "__main__":
    main()
