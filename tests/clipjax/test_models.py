"""Tests for clipjax.models: shared layers (scan/remat/decode), CLIP towers and the registry."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clipjax.models import layers  # noqa: E402

WIDTH, HEADS, LAYERS, LEN, BATCH = 32, 4, 3, 7, 2


def _x(seed=0, shape=(BATCH, LEN, WIDTH)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


# ----------------------------------------------------------------------------- layers
@pytest.fixture(scope="module")
def unscanned():
    model = layers.Transformer(LAYERS, WIDTH, HEADS, scan=False)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), _x())["params"])
    return model, params


def _perturbed(params, seed=3):
    """Random values everywhere (zero-init biases would hide mapping mistakes)."""
    rng = np.random.RandomState(seed)  # numpy: eager jax.random would compile once per shape
    return jax.tree_util.tree_map(lambda l: jnp.asarray(l + 0.1 * rng.randn(*l.shape), jnp.float32), params)


def test_activations_match_definitions():
    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_allclose(layers.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6,
                               atol=1e-6)
    from scipy.special import erf
    np.testing.assert_allclose(layers.gelu(x), 0.5 * x * (1 + erf(np.asarray(x) / np.sqrt(2))), atol=1e-6)
    with pytest.raises(ValueError, match="Unknown activation"):
        layers.MLP(8, activation="relu6").init(jax.random.PRNGKey(0), jnp.ones((1, 4)))


def test_layernorm_is_f32_and_normalises():
    x = (_x() * 10 + 3).astype(jnp.bfloat16)
    ln = layers.LayerNorm(dtype=jnp.bfloat16)
    v = ln.init(jax.random.PRNGKey(0), x)
    y = ln.apply(v, x)
    assert y.dtype == jnp.bfloat16
    yf = np.asarray(y, np.float32)
    np.testing.assert_allclose(yf.mean(-1), 0, atol=3e-2)
    np.testing.assert_allclose(yf.std(-1), 1, atol=3e-2)


def test_param_axes_are_logical():
    model = layers.Transformer(2, WIDTH, HEADS, scan=True)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), _x())["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(l, nn.Partitioned) for l in leaves)
    for leaf in leaves:
        assert leaf.names[0] == "layers" and len(leaf.names) == leaf.value.ndim
    qkv = boxed["layers"]["attn"]["qkv"]["kernel"]
    assert qkv.names == ("layers", "embed", None, "heads", "kv")
    assert qkv.value.shape == (2, WIDTH, 3, HEADS, WIDTH // HEADS)


def test_scan_equals_unscanned(unscanned):
    model, params = unscanned
    params = _perturbed(params)
    mask = layers.make_causal_mask(LEN)
    ref = model.apply({"params": params}, _x(), mask)
    scanned = layers.Transformer(LAYERS, WIDTH, HEADS, scan=True)
    stacked = layers.stack_layers(params)
    assert set(stacked) == {"layers"}
    out = scanned.apply({"params": stacked}, _x(), mask)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # restacking round-trips exactly
    back = layers.unstack_layers(stacked)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_stack_layers_keeps_partition_names():
    boxed = layers.Transformer(2, WIDTH, HEADS).init(jax.random.PRNGKey(0), _x())["params"]
    stacked = layers.stack_layers(boxed)
    kernel = stacked["layers"]["mlp"]["fc"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == ("layers", "embed", "mlp")
    back = layers.unstack_layers(stacked)
    assert back["layers_1"]["mlp"]["fc"]["kernel"].names == ("embed", "mlp")


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_gives_identical_grads(unscanned, policy):
    _, params = unscanned
    params = layers.stack_layers(_perturbed(params))
    x = _x(5)

    def loss(model, p):
        return jnp.sum(jnp.tanh(model.apply({"params": p}, x, layers.make_causal_mask(LEN))))

    plain = layers.Transformer(LAYERS, WIDTH, HEADS, scan=True)
    remat = layers.Transformer(LAYERS, WIDTH, HEADS, scan=True, remat_policy=policy)
    g0 = jax.grad(lambda p: loss(plain, p))(params)
    g1 = jax.grad(lambda p: loss(remat, p))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g0, g1)
    assert any(np.abs(np.asarray(l)).max() > 0 for l in jax.tree_util.tree_leaves(g1))


def test_unknown_remat_policy():
    with pytest.raises(ValueError, match="Unknown remat_policy"):
        layers.Transformer(1, WIDTH, HEADS, remat_policy="bogus").init(jax.random.PRNGKey(0), _x())


def _per_layer_masks():
    """Three mask types: causal, causal within a window of 3, causal on even keys (+ self)."""
    q = np.arange(LEN)[:, None]
    k = np.arange(LEN)[None, :]
    causal = k <= q
    window = causal & (q - k < 3)
    even = causal & ((k % 2 == 0) | (k == q))
    return jnp.asarray(np.stack([causal, window, even]))


@pytest.mark.parametrize("scan", [False, True])
def test_layer_masks_select_per_layer(unscanned, scan):
    model, params = unscanned
    params = _perturbed(params)
    types = (1, 2, 0)
    lm = _per_layer_masks()
    # Reference: unscanned blocks applied one by one with explicit masks.
    x = _x(7)
    ref = x
    block = layers.ResidualBlock(HEADS, 4 * WIDTH)
    for i, t in enumerate(types):
        ref = block.apply({"params": params[f"layers_{i}"]}, ref, lm[t][None, None])
    m = layers.Transformer(LAYERS, WIDTH, HEADS, scan=scan, layer_types=types)
    out = m.apply({"params": layers.stack_layers(params) if scan else params}, x, layer_masks=lm)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # A different assignment of masks really changes the result.
    other = layers.Transformer(LAYERS, WIDTH, HEADS, scan=scan, layer_types=(0, 0, 0))
    out2 = other.apply({"params": layers.stack_layers(params) if scan else params}, x, layer_masks=lm)
    assert np.abs(np.asarray(out2 - out)).max() > 1e-3


def test_layer_masks_bad_input(unscanned):
    model, params = unscanned
    with pytest.raises(ValueError, match="layer_types"):
        model.apply({"params": params}, _x(), layer_masks=_per_layer_masks())
    bad = layers.Transformer(LAYERS, WIDTH, HEADS, layer_types=(0, 5, 0))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bad.apply({"params": params}, _x(), layer_masks=_per_layer_masks())


@pytest.mark.parametrize("scan,use_layer_masks,step", [(False, False, 1), (True, False, 1), (True, True, 1),
                                                      (False, True, 2)])
def test_decode_matches_full_forward(unscanned, scan, use_layer_masks, step):
    _, params = unscanned
    params = _perturbed(params)
    p = layers.stack_layers(params) if scan else params
    types = (1, 2, 0) if use_layer_masks else None
    x = _x(9)
    full = layers.Transformer(LAYERS, WIDTH, HEADS, scan=scan, layer_types=types)
    lm = _per_layer_masks()
    if use_layer_masks:
        ref = full.apply({"params": p}, x, layer_masks=lm)
    else:
        ref = full.apply({"params": p}, x, layers.make_causal_mask(LEN))

    dec = layers.Transformer(LAYERS, WIDTH, HEADS, scan=scan, decode=True, layer_types=types)
    cache = dec.init(jax.random.PRNGKey(0), jnp.zeros_like(x))["cache"]

    @jax.jit
    def one_step(cache, xt, pos):
        rows = None
        if use_layer_masks:
            rows = jax.lax.dynamic_slice_in_dim(lm, pos, step, axis=1)  # n_types q max_len
        out, vars_ = dec.apply({"params": p, "cache": cache}, xt, layer_masks=rows, mutable=["cache"])
        return out, vars_["cache"]

    outs = []
    for pos in range(0, LEN - LEN % step, step):
        o, cache = one_step(cache, x[:, pos:pos + step], pos)
        outs.append(o)
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, ref[:, :got.shape[1]], atol=1e-5, rtol=1e-5)


def test_attention_bf16_softmax_in_f32():
    attn = layers.Attention(HEADS, dtype=jnp.bfloat16)
    x = _x()
    v = attn.init(jax.random.PRNGKey(0), x)
    y = attn.apply(v, x)
    assert y.dtype == jnp.bfloat16
    y32 = layers.Attention(HEADS).apply(v, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=5e-2)


def test_attention_rejects_bad_width():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        layers.Attention(5).init(jax.random.PRNGKey(0), _x())


# ----------------------------------------------------------------------------- CLIP models
from clipjax.models import (CLIP, clip_logits, create_model, get_model_config, list_models,  # noqa: E402
                            stack_layers)
from clipjax.models.vit import patch_dropout  # noqa: E402

REGISTRY_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
                  "ViT-L-14-336"]


def _init_key(seed=0):
    """rbg keys compile a whole-model init ~3x faster than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def _clip_inputs(model, batch=2, seed=0, length=None):
    cfg = model.config
    rng = np.random.RandomState(seed)
    s = cfg.vision.image_size
    images = rng.randn(batch, s, s, 3).astype(np.float32)
    tokens = np.zeros((batch, length or cfg.text.context_length), np.int32)
    for i in range(batch):
        n = 2 + 3 * i
        tokens[i, 0] = 49406
        tokens[i, 1:n + 1] = rng.randint(1, 49000, n)
        tokens[i, n + 1] = 49407
    return images, tokens


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny_clip(request):
    model = create_model(request.param)
    images, tokens = _clip_inputs(model)
    boxed = jax.jit(model.init)(_init_key(), images, tokens)
    variables = nn.meta.unbox(boxed)
    apply = jax.jit(model.apply, static_argnames=("train",))
    return request.param, model, boxed, variables, apply


def test_registry_names_and_errors():
    names = list_models()
    for n in REGISTRY_NAMES:
        assert n in names and f"{n}-quickgelu" in names
        assert get_model_config(f"{n}-quickgelu").quick_gelu and not get_model_config(n).quick_gelu
    assert "tiny-vit" in names and "tiny-rn" in names
    with pytest.raises(ValueError, match="Known models: .*ViT-B-32"):
        create_model("ViT-Q-99")
    with pytest.raises(ValueError, match="Unknown override 'vision_depth'"):
        create_model("tiny-vit", vision_depth=3)
    m = create_model("ViT-B-32", vision_image_size=256, text_layers=6, embed_dim=256, dtype=jnp.bfloat16, scan=True)
    assert m.config.vision.image_size == 256 and m.config.text.layers == 6 and m.config.embed_dim == 256
    assert m.dtype == jnp.bfloat16 and m.scan
    with pytest.raises(ValueError, match="not divisible by vision.patch_size"):
        create_model("ViT-B-32", vision_image_size=250)
    assert get_model_config("RN50").vision.heads == 32 and get_model_config("ViT-L-14").vision.heads == 16


@pytest.mark.parity
def test_registry_matches_open_clip_json():
    import json

    import open_clip
    root = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    for name in REGISTRY_NAMES + [f"{n}-quickgelu" for n in REGISTRY_NAMES]:
        with open(os.path.join(root, f"{name}.json")) as f:
            ref = json.load(f)
        cfg = get_model_config(name)
        v, t = ref["vision_cfg"], ref["text_cfg"]
        assert cfg.embed_dim == ref["embed_dim"], name
        assert cfg.quick_gelu == ref.get("quick_gelu", False), name
        layers = tuple(v["layers"]) if isinstance(v["layers"], list) else v["layers"]
        assert (cfg.vision.image_size, cfg.vision.layers, cfg.vision.width, cfg.vision.patch_size) == \
            (v["image_size"], layers, v["width"], v.get("patch_size")), name
        assert cfg.vision.head_width == v.get("head_width", 64)
        assert (cfg.text.context_length, cfg.text.vocab_size, cfg.text.width, cfg.text.heads, cfg.text.layers) == \
            (t["context_length"], t["vocab_size"], t["width"], t["heads"], t["layers"]), name


def test_every_param_has_logical_axes(tiny_clip):
    _, _, boxed, _, _ = tiny_clip
    leaves = jax.tree_util.tree_leaves_with_path(boxed["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)


def test_clip_outputs(tiny_clip):
    name, model, _, variables, apply = tiny_clip
    images, tokens = _clip_inputs(model)
    out = apply(variables, images, tokens)
    e = model.config.embed_dim
    assert out["image_features"].shape == (2, e) and out["text_features"].shape == (2, e)
    np.testing.assert_allclose(np.linalg.norm(out["image_features"], axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_features"], axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    assert "logit_bias" not in out
    logits = clip_logits(out)
    assert logits.shape == (2, 2)
    # encode_* agree with __call__
    img = jax.jit(lambda v, x: model.apply(v, x, normalize=True, method=CLIP.encode_image))(variables, images)
    np.testing.assert_allclose(img, out["image_features"], atol=1e-5)
    raw = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text))(variables, tokens)
    assert not np.allclose(np.linalg.norm(raw, axis=-1), 1)
    # train=True without patch dropout / BN training changes nothing
    np.testing.assert_allclose(apply(variables, images, tokens, train=True)["image_features"],
                               out["image_features"], atol=1e-6)


def test_text_pooling_uses_eot_and_causality(tiny_clip):
    name, model, _, variables, _ = tiny_clip
    _, tokens = _clip_inputs(model)
    enc = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text))
    full = enc(variables, tokens)
    short = enc(variables, tokens[:, :16])  # causal mask: padding after the EOT cannot matter
    np.testing.assert_allclose(short, full, atol=1e-5)
    changed = tokens.copy()
    changed[:, 12:] = 7  # tokens after the EOT change; pooled features must not
    np.testing.assert_allclose(enc(variables, changed), full, atol=1e-5)
    before = tokens.copy()
    before[:, 1] = 1234  # a token before the EOT changes -> features change
    assert np.abs(np.asarray(enc(variables, before) - full)).max() > 1e-4


def test_scan_clip_equals_unscanned(tiny_clip):
    name, model, _, variables, apply = tiny_clip
    images, tokens = _clip_inputs(model)
    scanned = create_model(name, scan=True, remat_policy="dots_saveable")
    out = jax.jit(scanned.apply)(stack_layers(variables), images, tokens)
    ref = apply(variables, images, tokens)
    for k in ("image_features", "text_features"):
        np.testing.assert_allclose(out[k], ref[k], atol=1e-5)


def test_bad_inputs_fail_clearly(tiny_clip):
    _, model, _, variables, _ = tiny_clip
    s = model.config.vision.image_size
    with pytest.raises(ValueError, match=rf"expects images of shape \(batch, {s}, {s}, 3\)"):
        model.apply(variables, np.zeros((1, 3, s, s), np.float32), method=CLIP.encode_image)
    with pytest.raises(ValueError, match="context_length=77"):
        model.apply(variables, np.zeros((1, 80), np.int32), method=CLIP.encode_text)
    with pytest.raises(ValueError, match="integer ids"):
        model.apply(variables, np.zeros((1, 77), np.float32), method=CLIP.encode_text)


def test_bf16_close_to_f32(tiny_clip):
    name, model, _, variables, apply = tiny_clip
    images, tokens = _clip_inputs(model)
    m16 = create_model(name, dtype=jnp.bfloat16)
    out16 = jax.jit(m16.apply)(variables, images, tokens)
    ref = apply(variables, images, tokens)
    assert out16["image_features"].dtype == jnp.float32  # features are returned in f32
    for k in ("image_features", "text_features"):
        cos = np.sum(np.asarray(out16[k]) * np.asarray(ref[k]), -1)
        assert cos.min() > 0.98, (k, cos)


def test_resnet_batchnorm_modes(tiny_clip):
    name, model, _, v, apply = tiny_clip
    if name != "tiny-rn":
        assert "batch_stats" not in v  # a ViT has no BatchNorm state
        return
    images, tokens = _clip_inputs(model)
    assert "batch_stats" in v
    # default: inference-mode BN even with train=True, so no mutable collection is needed
    apply(v, images, tokens, train=True)
    from clipjax.models.resnet import ModifiedResNet
    cfg = model.config.vision
    rn = ModifiedResNet(cfg.image_size, cfg.layers, cfg.width, cfg.heads, 32, batchnorm_train=True)
    vv = {"params": v["params"]["visual"], "batch_stats": v["batch_stats"]["visual"]}
    _, updated = jax.jit(lambda v, x: rn.apply(v, x, train=True, mutable=["batch_stats"]))(vv, images)
    assert not np.allclose(updated["batch_stats"]["bn1"]["mean"], vv["batch_stats"]["bn1"]["mean"])


def test_patch_dropout():
    x = jnp.arange(2 * 17 * 4, dtype=jnp.float32).reshape(2, 17, 4)
    y = patch_dropout(x, 0.5, jax.random.PRNGKey(0))
    assert y.shape == (2, 9, 4)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # class token kept
    rows = {tuple(r) for r in np.asarray(x[0, 1:])}
    assert all(tuple(r) in rows for r in np.asarray(y[0, 1:]))  # kept patches are real patches
    assert len({tuple(r) for r in np.asarray(y[0, 1:])}) == 8  # no duplicates

    model = create_model("tiny-vit", vision_patch_dropout=0.5)
    images, tokens = _clip_inputs(model)
    v = nn.meta.unbox(jax.jit(model.init)(_init_key(), images, tokens))
    enc = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r}, method=CLIP.encode_image))
    a, b = enc(v, images, jax.random.PRNGKey(1)), enc(v, images, jax.random.PRNGKey(2))
    assert np.abs(np.asarray(a - b)).max() > 1e-4  # random subsets
    ev = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))
    e1, e2 = ev(v, images), ev(v, images)
    np.testing.assert_array_equal(e1, e2)  # eval: deterministic, all patches
    with pytest.raises(ValueError, match="patch_dropout"):
        create_model("tiny-vit", vision_patch_dropout=1.0)


def test_logit_bias_config():
    model = create_model("tiny-vit", init_logit_bias=-10.0, init_logit_scale=float(np.log(10.0)))
    images, tokens = _clip_inputs(model)
    v = jax.jit(model.init)(_init_key(), images, tokens)
    out = jax.jit(model.apply)(v, images, tokens)
    np.testing.assert_allclose(out["logit_bias"], -10.0)
    np.testing.assert_allclose(out["logit_scale"], 10.0, rtol=1e-5)
    np.testing.assert_allclose(clip_logits(out), 10.0 * out["image_features"] @ out["text_features"].T - 10.0,
                               rtol=1e-5, atol=1e-5)
