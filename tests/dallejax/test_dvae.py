"""dallejax.dvae: architecture, pixel mapping, objective pieces, tiny-config training."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dallejax import dvae

# Parameter counts of dall_e.Encoder() / dall_e.Decoder() (defaults); checked against the
# package itself in test_dvae_convert.py (parity).
REFERENCE_ENCODER_PARAMS = 53_786_240
REFERENCE_DECODER_PARAMS = 43_829_766
ALLOWED_AXES = {"batch", "embed", "mlp", "heads", "kv", "vocab", "length", "conv_in", "conv_out",
                "height", "width", "layers", None}


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- full size
@pytest.fixture(scope="module")
def full_shapes():
    model = dvae.DVAE()
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    return model, boxed


def test_full_size_parameter_count_matches_reference(full_shapes):
    _, boxed = full_shapes
    params = nn.meta.unbox(boxed)["params"]
    assert _count(params["encoder"]) == REFERENCE_ENCODER_PARAMS
    assert _count(params["decoder"]) == REFERENCE_DECODER_PARAMS
    enc = params["encoder"]
    assert enc["input"]["kernel"].shape == (7, 7, 3, 256)
    assert enc["group_4"]["block_1"]["skip"]["kernel"].shape == (1, 1, 1024, 2048)
    assert enc["output"]["kernel"].shape == (1, 1, 2048, 8192)
    dec = params["decoder"]
    assert dec["input"]["kernel"].shape == (1, 1, 8192, 128)
    assert dec["group_1"]["block_1"]["conv_1"]["kernel"].shape == (1, 1, 128, 512)
    assert dec["output"]["kernel"].shape == (1, 1, 256, 6)


def test_full_size_shapes_without_materialising(full_shapes):
    model, boxed = full_shapes
    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=dvae.DVAE.encode), boxed, images)
    assert (tokens.shape, tokens.dtype) == ((2, 32, 32), jnp.int32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, method=dvae.DVAE.encoder_logits), boxed, images)
    assert (logits.shape, logits.dtype) == ((2, 32, 32, 8192), jnp.float32)
    recon = jax.eval_shape(lambda v, t: model.apply(v, t, method=dvae.DVAE.decode), boxed, tokens)
    assert (recon.shape, recon.dtype) == ((2, 256, 256, 3), jnp.float32)
    stats = jax.eval_shape(lambda v, t: model.apply(v, t, method=dvae.DVAE.decoder_stats), boxed, tokens)
    assert stats.shape == (2, 256, 256, 6)
    assert model.token_grid == 32


def test_every_param_has_logical_axes(full_shapes):
    _, boxed = full_shapes
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert set(box.names) <= ALLOWED_AXES, box.names
        assert len(box.names) == box.value.ndim
        if box.value.ndim == 4:
            assert box.names[:2] == ("height", "width")


# ----------------------------------------------------------------------------- pieces
def test_map_unmap_pixels():
    x = jnp.linspace(0.0, 1.0, 101)
    m = dvae.map_pixels(x)
    assert float(m.min()) == pytest.approx(0.1) and float(m.max()) == pytest.approx(0.9)
    np.testing.assert_allclose(dvae.unmap_pixels(m), x, atol=1e-6)
    np.testing.assert_array_equal(dvae.unmap_pixels(jnp.array([0.0, 0.05, 0.95, 1.0])), [0, 0, 1, 1])
    np.testing.assert_allclose(dvae.map_pixels(x, eps=0.2), 0.6 * x + 0.2, atol=1e-7)


@pytest.mark.parametrize("mu,log_b", [(0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)])
def test_logit_laplace_is_a_normalised_density(mu, log_b):
    """exp(-nll) integrates to 1 over (0, 1), i.e. the Jacobian 1/(x(1-x)) term is right."""
    x = np.linspace(1e-6, 1 - 1e-6, 400001)
    nll = np.asarray(dvae.logit_laplace_nll(jnp.asarray(x, jnp.float32), mu, log_b), np.float64)
    assert np.trapezoid(np.exp(-nll), x) == pytest.approx(1.0, abs=2e-3)
    # Spot value against the closed form.
    xv, b = 0.3, math.exp(log_b)
    expect = math.log(2 * b * xv * (1 - xv)) + abs(math.log(xv / (1 - xv)) - mu) / b
    got = float(dvae.logit_laplace_nll(jnp.float32(xv), jnp.float32(mu), jnp.float32(log_b)))
    assert got == pytest.approx(expect, rel=1e-5)


def test_kl_to_uniform():
    k = 64
    assert float(dvae.kl_to_uniform(jnp.zeros((k,)))) == pytest.approx(0.0, abs=1e-6)
    peaked = jnp.zeros((k,)).at[3].set(100.0)
    assert float(dvae.kl_to_uniform(peaked)) == pytest.approx(math.log(k), rel=1e-4)
    logits = jax.random.normal(jax.random.key(0), (5, k))
    q = jax.nn.softmax(logits)
    np.testing.assert_allclose(dvae.kl_to_uniform(logits), jnp.sum(q * jnp.log(q * k), -1), rtol=1e-5)


def test_gumbel_softmax():
    logits = jax.random.normal(jax.random.key(0), (1000, 16)) * 3
    z = dvae.gumbel_softmax(jax.random.key(1), logits, 1.0)
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-5)
    cold = dvae.gumbel_softmax(jax.random.key(1), logits, 1e-3)
    assert float(jnp.mean(cold.max(-1) > 0.99)) > 0.97  # ~one-hot at low temperature
    # argmax of the noisy logits is a categorical sample: frequencies follow softmax(logits).
    row = jnp.broadcast_to(jnp.array([0.0, 1.0, 2.0]), (20000, 3))
    picks = jnp.argmax(dvae.gumbel_softmax(jax.random.key(2), row, 0.01), -1)
    freq = np.bincount(np.asarray(picks), minlength=3) / 20000
    np.testing.assert_allclose(freq, jax.nn.softmax(jnp.array([0.0, 1.0, 2.0])), atol=0.02)


def test_schedules_are_cosine_and_jittable():
    cfg = dvae.default_config().loss
    tau = jax.jit(lambda s: dvae.temperature_schedule(s, cfg))
    beta = jax.jit(lambda s: dvae.kl_weight_schedule(s, cfg))
    assert float(tau(0)) == pytest.approx(1.0)
    assert float(tau(75_000)) == pytest.approx((1 + 1 / 16) / 2, rel=1e-5)
    assert float(tau(150_000)) == pytest.approx(1 / 16) and float(tau(10**6)) == pytest.approx(1 / 16)
    assert float(beta(0)) == pytest.approx(0.0)
    assert float(beta(2500)) == pytest.approx(3.3, rel=1e-5)
    assert float(beta(5000)) == pytest.approx(6.6) and float(beta(9999)) == pytest.approx(6.6)
    # Cosine: a quarter of the way, 1 - cos(pi/4) / 2 of the change is done.
    assert float(beta(1250)) == pytest.approx(6.6 * (1 - math.cos(math.pi / 4)) / 2, rel=1e-5)


def test_codebook_stats():
    s = dvae.codebook_stats(jnp.array([0, 0, 1, 1, 2, 2, 3, 3]), 16)
    assert float(s["perplexity"]) == pytest.approx(4.0, rel=1e-5)
    assert float(s["codebook_usage"]) == pytest.approx(4 / 16)


# ----------------------------------------------------------------------------- tiny model
def _tiny_config():
    cfg = dvae.default_config()
    cfg.model.update(group_count=2, n_hid=16, n_blk_per_group=1, vocab_size=32, n_init=16,
                     image_size=16)
    cfg.loss.update(temperature_steps=100, kl_weight_steps=100)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    cfg = _tiny_config()
    model = dvae.model_from_config(cfg)
    variables = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    # Smooth, learnable images: random blobs.
    yy, xx = np.mgrid[0:16, 0:16] / 15.0
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(8):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        color = rng.uniform(0, 1, 3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < (r * 0.5) ** 2)[..., None]
        imgs.append(np.where(mask, color, 1 - color).astype(np.float32))
    images = np.stack(imgs)
    loss_fn = jax.jit(lambda p, b, r, s: dvae.dvae_loss(p, b, r, s, cfg))
    grad_fn = jax.jit(jax.grad(lambda p, b, r, s: dvae.dvae_loss(p, b, r, s, cfg)[0]))
    return cfg, model, variables, images, loss_fn, grad_fn


def test_tiny_token_grid_and_decode_range(tiny):
    _, model, v, images, _, _ = tiny
    tokens = model.apply(v, images, method=dvae.DVAE.encode)
    assert tokens.shape == (8, 8, 8) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    recon = model.apply(v, tokens, method=dvae.DVAE.decode)
    assert recon.shape == images.shape
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


def test_decoder_int_tokens_equal_one_hot_codes(tiny):
    _, model, v, images, _, _ = tiny
    tokens = model.apply(v, images, method=dvae.DVAE.encode)
    a = model.apply(v, tokens, method=dvae.DVAE.decoder_stats)
    b = model.apply(v, jax.nn.one_hot(tokens, 32), method=dvae.DVAE.decoder_stats)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_loss_finite_and_differentiable(tiny):
    _, _, v, images, loss_fn, grad_fn = tiny
    loss, metrics = loss_fn(v, {"image": images}, jax.random.key(1), 50)
    assert np.isfinite(float(loss))
    expected = {"loss", "recon_nll", "kl", "elbo_bpd", "mse", "psnr", "temperature", "beta",
                "perplexity", "codebook_usage"}
    assert expected <= set(metrics)
    assert all(np.isfinite(float(m)) for m in metrics.values())
    assert float(metrics["temperature"]) == pytest.approx((1 + 1 / 16) / 2, rel=1e-5)
    assert float(metrics["beta"]) == pytest.approx(3.3, rel=1e-5)
    assert 0 < float(metrics["codebook_usage"]) <= 1
    assert 1 <= float(metrics["perplexity"]) <= 32
    assert float(metrics["psnr"]) == pytest.approx(-10 * math.log10(float(metrics["mse"])), rel=1e-4)
    # The loss is the beta-weighted ELBO per dim.
    assert float(loss) == pytest.approx(
        float(metrics["recon_nll"]) + 3.3 * float(metrics["kl"]) * 64 / (16 * 16 * 3), rel=1e-4)
    grads = grad_fn(v, images, jax.random.key(1), 50)
    norms = {k: float(optax.tree.norm(g)) for k, g in grads["params"].items()}
    assert set(norms) == {"encoder", "decoder"}
    assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms
    # uint8 batches are accepted and scaled.
    loss_u8, _ = loss_fn(v, {"image": (images * 255).round().astype(np.uint8)}, jax.random.key(1), 50)
    assert float(loss_u8) == pytest.approx(float(loss), abs=2e-2)


def test_few_adam_steps_reduce_the_loss(tiny):
    cfg, _, v, images, loss_fn, _ = tiny
    opt = optax.adam(3e-3)
    step = 20  # fixed schedule point; same Gumbel key before/after for a fair comparison

    @jax.jit
    def update(params, state, rng):
        (loss, _), grads = jax.value_and_grad(dvae.dvae_loss, has_aux=True)(params, images, rng, step, cfg)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state = v, opt.init(v)
    key = jax.random.key(3)
    before = float(loss_fn(v, images, key, step)[0])
    for i in range(15):
        params, state, _ = update(params, state, jax.random.fold_in(key, i))
    after = float(loss_fn(params, images, key, step)[0])
    assert after < before - 0.05, (before, after)


def test_reconstruction_metrics_padding_invariant(tiny):
    _, model, v, images, _, _ = tiny
    full = dvae.reconstruction_metrics(model, v, images, batch_size=8)
    padded = dvae.reconstruction_metrics(model, v, images, batch_size=3)
    for k in ("mse", "psnr", "codebook_usage", "perplexity"):
        assert full[k] == pytest.approx(padded[k], rel=1e-5), k
    assert full["num_images"] == 8
    tokens = np.asarray(model.apply(v, images, method=dvae.DVAE.encode))
    recon = np.asarray(model.apply(v, tokens, method=dvae.DVAE.decode))
    assert full["mse"] == pytest.approx(float(np.mean((recon - images) ** 2)), rel=1e-5)
    assert full["codebook_usage"] == pytest.approx(len(np.unique(tokens)) / 32)


def test_32px_two_groups_digits_config():
    model = dvae.DVAE(group_count=2, n_hid=32, n_blk_per_group=1, vocab_size=64, input_channels=1,
                      image_size=32, n_init=32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    tokens = jax.eval_shape(lambda v, x: model.apply(v, x, method=dvae.DVAE.encode), boxed,
                            jax.ShapeDtypeStruct((4, 32, 32, 1), jnp.float32))
    assert tokens.shape == (4, 16, 16) and model.token_grid == 16  # 2**(groups-1) = 2x down
    model3 = model.clone(group_count=3)
    assert model3.token_grid == 8


def test_bfloat16_compute_keeps_f32_logits(tiny):
    cfg, _, v, images, _, _ = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.model.dtype = "bfloat16"
    model = dvae.model_from_config(cfg)
    logits = model.apply(v, images, method=dvae.DVAE.encoder_logits)
    assert logits.dtype == jnp.float32
    ref = dvae.model_from_config(_tiny_config()).apply(v, images, method=dvae.DVAE.encoder_logits)
    assert float(jnp.abs(logits - ref).max()) < 0.1 * float(jnp.abs(ref).max())


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tiny):
    _, model, v, images, _, _ = tiny
    with pytest.raises(ValueError, match="NCHW"):
        model.apply(v, images.transpose(0, 3, 1, 2), method=dvae.DVAE.encode)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.apply(v, images[:, :15, :15], method=dvae.DVAE.encode)
    with pytest.raises(ValueError, match="uint8"):
        model.apply(v, (images * 255).astype(np.uint8), method=dvae.DVAE.encode)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\)"):
        model.apply(v, jnp.full((1, 8, 8), 32), method=dvae.DVAE.decode)
    with pytest.raises(ValueError, match="integer tokens"):
        model.apply(v, jnp.zeros((1, 8, 8)), method=dvae.DVAE.decode)
    with pytest.raises(ValueError, match="unknown keys"):
        dvae.model_from_config({"model": {"n_hidden": 3}})


def test_forward_flops_matches_xla_cost_analysis():
    model = dvae.DVAE(group_count=2, n_hid=16, n_blk_per_group=2, vocab_size=32, n_init=8,
                      image_size=64)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    z = jax.ShapeDtypeStruct((1, 32, 32, 32), jnp.float32)
    cost = lambda f, a: jax.jit(f).lower(v, a).compile().cost_analysis()["flops"]
    enc = cost(lambda v, x: model.apply(v, x, method=dvae.DVAE.encoder_logits), x)
    dec = cost(lambda v, z: model.apply(v, z, method=dvae.DVAE.decoder_stats), z)
    ours = dvae.forward_flops(model)
    # XLA skips the zero padding of convs but adds elementwise ops: within ~1% at 64 px.
    assert ours["encoder"] == pytest.approx(enc, rel=0.03)
    assert ours["decoder"] == pytest.approx(dec, rel=0.03)
    assert dvae.forward_flops(dvae.DVAE())["encoder"] > 1e11  # full size: ~0.2 TFLOP / image
