"""DalleTransformer: layout, sparse-mask wiring, padding tokens, loss, scan/remat/dtype, 12B shape."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.models.layers import stack_layers
from dallejax import masks as masks_lib
from dallejax.transformer import (DalleConfig, DalleTransformer, count_params, dalle_loss, model_from_config,
                                  remap_text_padding, token_losses)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = DalleConfig(text_vocab_size=40, text_len=6, image_vocab_size=24, grid=4, width=32, num_layers=4,
                  num_heads=4, attention="dalle", conv_kernel=3)
EOT = CFG.text_vocab_size - 1
LOGICAL = {"batch", "embed", "mlp", "heads", "kv", "vocab", "length", "conv_in", "conv_out", "height", "width",
           "layers", None}


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", "dalle", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _batch(cfg=CFG, b=2, seed=0):
    rs = np.random.RandomState(seed)
    text = rs.randint(0, cfg.text_vocab_size - 1, (b, cfg.text_len)).astype(np.int32)
    text[:, 0] = cfg.text_vocab_size - 2                 # start token
    if cfg.text_len > 4:
        text[0, 3] = cfg.end_of_text                     # row 0: padded after position 3
        text[0, 4:] = 0
    image = rs.randint(0, cfg.image_vocab_size, (b, cfg.image_len)).astype(np.int32)
    return text, image


@pytest.fixture(scope="module")
def model_and_params():
    model = DalleTransformer(CFG)
    text, image = _batch()
    variables = model.init(jax.random.PRNGKey(0), text, image)
    return model, nn.meta.unbox(variables["params"]), variables["params"]


@pytest.fixture(scope="module")
def forward(model_and_params):
    model, params, _ = model_and_params
    return jax.jit(lambda p, t, i: model.apply({"params": p}, t, i))


def test_output_shapes_and_dtypes(model_and_params, forward):
    model, params, _ = model_and_params
    text, image = _batch()
    tl, il = forward(params, text, image)
    assert tl.shape == (2, CFG.text_len - 1, CFG.text_vocab_size + CFG.text_len) and tl.dtype == jnp.float32
    assert il.shape == (2, CFG.image_len, CFG.image_vocab_size) and il.dtype == jnp.float32
    # b h w image tokens are accepted too
    _, il2 = forward(params, text, image.reshape(2, CFG.grid, CFG.grid))
    np.testing.assert_array_equal(il, il2)


def test_every_param_has_logical_axes(model_and_params):
    _, _, boxed = model_and_params
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL, (path, leaf.names)
    p = boxed
    assert p["text_embedding"].names == ("vocab", "embed")
    assert p["image_row"].names == ("height", "embed") and p["image_column"].names == ("width", "embed")
    assert p["image_head"]["kernel"].names == ("embed", "vocab")


def test_causal_and_modality_layout(model_and_params, forward):
    """Changing image token k changes image logits only for positions predicting tokens after k,
    and never the text logits."""
    _, params, _ = model_and_params
    text, image = _batch()
    tl, il = forward(params, text, image)
    k = 6
    image2 = image.copy()
    image2[:, k] = (image2[:, k] + 1) % CFG.image_vocab_size
    tl2, il2 = forward(params, text, image2)
    np.testing.assert_array_equal(tl, tl2)
    np.testing.assert_array_equal(il[:, : k + 1], il2[:, : k + 1])
    assert np.abs(il[:, k + 1] - il2[:, k + 1]).max() > 1e-4
    # changing the last text token changes every image prediction but no earlier text prediction
    text2 = text.copy()
    text2[1, -1] = (text2[1, -1] + 1) % (CFG.text_vocab_size - 1)
    tl3, il3 = forward(params, text2, image)
    np.testing.assert_array_equal(tl[1], tl3[1])     # last text token is only an input to the image part
    assert (np.abs(il[1] - il3[1]).max(axis=-1) > 1e-5).all()


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_single_layer_receptive_field_is_the_mask(kind):
    """A one-layer model: perturbing image token j changes the output at the position holding token i
    exactly when the mask lets i attend to j."""
    cfg = DalleConfig(text_vocab_size=40, text_len=3, image_vocab_size=24, grid=4, width=16, num_layers=1,
                      num_heads=2, attention=kind, conv_kernel=3)
    model = DalleTransformer(cfg)
    text, image = _batch(cfg, b=1)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), text, image)["params"])
    fwd = jax.jit(lambda i: model.apply({"params": params}, text, i)[1])
    base = np.asarray(fwd(image))
    mask = masks_lib.attention_mask(kind, cfg.text_len, cfg.grid, cfg.grid, cfg.conv_kernel)
    t, n = cfg.text_len, cfg.image_len
    for j in range(n - 1):                     # the last image token is never an input
        image2 = image.copy()
        image2[0, j] = (image2[0, j] + 7) % cfg.image_vocab_size
        out = np.asarray(fwd(image2))
        # position T + i holds image token i and yields image_logits[:, i + 1]
        changed = np.abs(out[0, 1:] - base[0, 1:]).max(axis=-1) > 1e-6
        np.testing.assert_array_equal(changed, mask[t:t + n - 1, t + j], err_msg=f"{kind}, token {j}")


def test_padding_tokens_are_position_specific(model_and_params, forward):
    model, params, _ = model_and_params
    text, image = _batch()
    remapped = np.asarray(remap_text_padding(jnp.asarray(text), CFG))
    np.testing.assert_array_equal(remapped[0, :4], text[0, :4])          # up to and including EOT
    np.testing.assert_array_equal(remapped[0, 4:], CFG.text_vocab_size + np.arange(4, CFG.text_len))
    np.testing.assert_array_equal(remapped[1], text[1])                  # no EOT -> no padding
    # whatever ids sit after EOT, the model sees the same padding tokens
    text2 = text.copy()
    text2[0, 4:] = [5, 17]
    for a, b in zip(forward(params, text, image), forward(params, text2, image)):
        np.testing.assert_array_equal(a[0], b[0])
    emb = model.apply({"params": params}, jnp.asarray(text), method=DalleTransformer.embed_text)
    for p in (4, 5):
        want = params["text_embedding"][CFG.text_vocab_size + p] + params["text_position"][p]
        np.testing.assert_allclose(emb[0, p], want, rtol=1e-6)
    assert not np.allclose(emb[0, 4], emb[0, 5])


def test_dalle_loss_weights_and_normalisation(model_and_params, forward):
    model, params, _ = model_and_params
    text, image = _batch()
    loss, metrics = dalle_loss(params, {"text": text, "image": image}, model)
    tl, il = (np.asarray(x, np.float64) for x in forward(params, text, image))

    def ce(logits, targets):
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, targets[..., None], -1).mean()

    targets = np.asarray(remap_text_padding(jnp.asarray(text), CFG))[:, 1:]
    text_ce, image_ce = ce(tl, targets), ce(il, image)
    np.testing.assert_allclose(metrics["text_loss"], text_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["image_loss"], image_ce, rtol=1e-5)
    np.testing.assert_allclose(loss, text_ce / 8 + 7 * image_ce / 8, rtol=1e-5)
    l2, _ = token_losses(*forward(params, text, image), text, image, CFG, text_weight=0.5)
    np.testing.assert_allclose(l2, (text_ce + image_ce) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="no 'image' entry"):
        dalle_loss(params, {"text": text}, model)


def test_scan_and_remat_match_unscanned(model_and_params):
    model, params, _ = model_and_params
    text, image = _batch()
    scanned = DalleTransformer(CFG, scan=True, remat_policy="dots_saveable")
    sparams = {**params, "transformer": stack_layers(params["transformer"])}

    def loss(m, p):
        return dalle_loss(p, {"text": text, "image": image}, m)[0]

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(sparams)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    g1 = {**g1, "transformer": stack_layers(g1["transformer"])}
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(g2))


def test_bfloat16_compute(model_and_params, forward):
    _, params, _ = model_and_params
    text, image = _batch()
    bf = DalleTransformer(CFG, dtype=jnp.bfloat16)
    tl, il = bf.apply({"params": params}, text, image)
    assert tl.dtype == il.dtype == jnp.float32
    ref = forward(params, text, image)[1]
    err = np.abs(np.asarray(il) - np.asarray(ref)).max()
    assert err < 0.05 * np.abs(np.asarray(ref)).max() + 1e-2, err
    params_bf = nn.meta.unbox(DalleTransformer(CFG, param_dtype=jnp.bfloat16).init(
        jax.random.PRNGKey(0), text, image)["params"])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params_bf))


def test_bad_inputs_give_clear_errors(model_and_params):
    model, params, _ = model_and_params
    text, image = _batch()
    apply = lambda t, i: model.apply({"params": params}, t, i)  # noqa: E731
    with pytest.raises(ValueError, match=r"text must be \(batch, 6\)"):
        apply(text[:, :5], image)
    with pytest.raises(ValueError, match="image must be"):
        apply(text, image[:, :10])
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, 40\)"):
        apply(text + 40, image)
    with pytest.raises(ValueError, match=r"image ids must lie in \[0, 24\)"):
        apply(text, image + 24)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DalleConfig(width=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="unknown keys"):
        model_from_config({"widht": 3})


def test_tiny_config_builds_and_matches_its_dvae():
    c = _load_config("tiny")
    model = model_from_config(c.model)
    assert model.config.text_vocab_size == 49408 and model.config.attention == "dalle"
    from dallejax.dvae import model_from_config as dvae_from_config
    dvae = dvae_from_config(dict(c.dvae))
    assert dvae.token_grid == model.config.grid and dvae.vocab_size == model.config.image_vocab_size
    assert count_params(model) > 0


def test_12b_parameter_count_from_eval_shape():
    c = _load_config("dalle_12b")
    model = model_from_config(c.model)
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.width // cfg.num_heads) == (64, 62, 64)
    assert (cfg.text_len, cfg.image_len, cfg.text_vocab_size, cfg.image_vocab_size) == (256, 1024, 16384, 8192)
    assert masks_lib.resolve_schedule(cfg.attention, 64) == masks_lib.dalle_schedule(64)
    n = count_params(model)
    print(f"DALL-E 12B config: {n:,} parameters ({n / 1e9:.3f}B)")
    assert abs(n - 12.0e9) <= 0.3e9, n
    d, v = cfg.width, cfg.text_vocab_size + cfg.text_len
    per_layer = 12 * d * d + 13 * d
    expect = 64 * per_layer + (v + 8192) * d + (256 + 64) * d + (v + 8192) * (d + 1) + 2 * d
    assert n == expect
