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
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


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
    boxed = model.init(jax.random.PRNGKey(0), _x())["params"]
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
