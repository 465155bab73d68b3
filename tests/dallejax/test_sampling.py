"""KV-cached sampling == full-recompute sampling; top-k/p, guidance, completion/editing; rerank; CLI."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.models.layers import stack_layers
from dallejax import sampling
from dallejax.transformer import DalleConfig, DalleTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = dict(text_vocab_size=40, text_len=6, image_vocab_size=24, grid=4, width=32, num_layers=4, num_heads=4,
            conv_kernel=3)
TOP_K = 5   # one compiled sampler per model: greedy = temperature 0 with the same static top_k


def _text(cfg, b=2):
    text = np.zeros((b, cfg.text_len), np.int32)
    text[:, 0] = cfg.text_vocab_size - 2
    text[0, 1:4] = [3, 9, cfg.end_of_text]
    text[1, 1:] = [7, 1, 12, 30, 2]
    return text


@pytest.fixture(scope="module")
def models():
    """(attention, scan) -> (model, params); scanned models get the same weights restacked."""
    out = {}
    for attention in ("dense", "dalle"):
        cfg = DalleConfig(attention=attention, **BASE)
        model = DalleTransformer(cfg)
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(3), _text(cfg),
                                          np.zeros((2, cfg.image_len), np.int32))["params"])
        # Scale the heads up so that random-model logits are far from ties and greedy paths vary.
        params["image_head"]["kernel"] = params["image_head"]["kernel"] * 20.0
        out[attention, False] = (model, params)
        out[attention, True] = (DalleTransformer(cfg, scan=True),
                                {**params, "transformer": stack_layers(params["transformer"])})
    return out


VARIANTS = [("dense", False), ("dense", True), ("dalle", False), ("dalle", True)]


@pytest.mark.parametrize("attention,scan", VARIANTS)
def test_cached_equals_uncached(models, attention, scan):
    model, params = models[attention, scan]
    text = _text(model.config)
    for kw in (dict(temperature=0.0), dict(temperature=1.0)):
        a = sampling.sample(model, params, text, 7, num_samples=2, top_k=TOP_K, **kw)
        b = sampling.sample_uncached(model, params, text, 7, num_samples=2, top_k=TOP_K, **kw)
        assert a.shape == (4, model.config.image_len) and a.dtype == jnp.int32
        np.testing.assert_array_equal(a, b, err_msg=f"{attention} scan={scan} {kw}")
        assert 0 <= int(a.min()) and int(a.max()) < model.config.image_vocab_size
        assert len(np.unique(np.asarray(a))) > 3, "degenerate samples make the comparison meaningless"
        if kw["temperature"] == 0.0:   # greedy: both samples of a caption agree
            np.testing.assert_array_equal(a[0], a[1])
            np.testing.assert_array_equal(a[2], a[3])
        else:                          # sampled: they differ
            assert (a[0] != a[1]).any() and (a[2] != a[3]).any()


@pytest.mark.parametrize("attention", ["dense", "dalle"])
def test_scan_does_not_change_samples(models, attention):
    text = _text(models[attention, False][0].config)
    a = sampling.sample(*models[attention, False], text, 7, num_samples=2, top_k=TOP_K, temperature=1.0)
    b = sampling.sample(*models[attention, True], text, 7, num_samples=2, top_k=TOP_K, temperature=1.0)
    np.testing.assert_array_equal(a, b)


def test_sparse_masks_change_the_samples(models):
    text = _text(models["dense", False][0].config)
    a = sampling.sample(*models["dense", False], text, 7, num_samples=2, top_k=TOP_K, temperature=0.0)
    dalle_model, _ = models["dalle", False]
    dense_params = models["dense", False][1]
    b = sampling.sample(dalle_model, dense_params, text, 7, num_samples=2, top_k=TOP_K, temperature=0.0)
    assert (np.asarray(a) != np.asarray(b)).any()


def test_decode_logits_match_teacher_forcing(models):
    model, params = models["dalle", True]
    cfg = model.config
    text = _text(cfg)
    image = np.random.RandomState(0).randint(0, cfg.image_vocab_size, (2, cfg.image_len)).astype(np.int32)
    _, want = model.apply({"params": params}, text, image)
    dec = model.clone(decode=True)
    cache = sampling.init_cache(model, 2)
    logits, state = dec.apply({"params": params, "cache": cache}, text, method=DalleTransformer.prefill,
                              mutable=["cache"])
    step = jax.jit(lambda c, tok, k: dec.apply({"params": params, "cache": c}, tok, k,
                                               method=DalleTransformer.decode_step, mutable=["cache"]))
    got = [logits]
    for k in range(cfg.image_len - 1):
        logits, state = step(state["cache"], image[:, k], k)
        got.append(logits)
    np.testing.assert_allclose(np.stack(got, 1), want, rtol=1e-4, atol=1e-4)


def test_seed_reproducibility(models):
    model, params = models["dalle", False]
    text = _text(model.config)
    kw = dict(num_samples=2, top_k=TOP_K, temperature=1.0)
    a = sampling.sample(model, params, text, 11, **kw)
    np.testing.assert_array_equal(a, sampling.sample(model, params, text, jax.random.PRNGKey(11), **kw))
    assert (np.asarray(a) != np.asarray(sampling.sample(model, params, text, 12, **kw))).any()


def test_top_p_and_temperature_cached_equals_uncached(models):
    model, params = models["dalle", True]
    text = _text(model.config)
    for kw in (dict(top_p=0.6, temperature=0.7), dict(top_p=0.95, temperature=1.5)):
        a = sampling.sample(model, params, text, 5, num_samples=2, top_k=TOP_K, **kw)
        b = sampling.sample_uncached(model, params, text, 5, num_samples=2, top_k=TOP_K, **kw)
        np.testing.assert_array_equal(a, b, err_msg=str(kw))


def test_completion_keeps_rows_and_matches_uncached(models):
    model, params = models["dalle", False]
    cfg = model.config
    text = _text(cfg)
    given = np.random.RandomState(1).randint(0, cfg.image_vocab_size, (2, cfg.image_len)).astype(np.int32)
    keep = sampling.completion_mask(cfg.grid, 2)
    assert keep.sum() == 2 * cfg.grid and keep[: 2 * cfg.grid].all()
    kw = dict(num_samples=2, top_k=TOP_K, temperature=1.0, fixed_tokens=given, fixed_mask=keep)
    a = np.asarray(sampling.sample(model, params, text, 3, **kw))
    np.testing.assert_array_equal(a, sampling.sample_uncached(model, params, text, 3, **kw))
    np.testing.assert_array_equal(a[:, keep], np.repeat(given, 2, axis=0)[:, keep])
    assert (a[:, ~keep] != np.repeat(given, 2, axis=0)[:, ~keep]).any()
    # the kept rows condition the rest: other given rows -> other completions
    given2 = (given + 1) % cfg.image_vocab_size
    b = np.asarray(sampling.sample(model, params, text, 3, **{**kw, "fixed_tokens": given2}))
    assert (a[:, ~keep] != b[:, ~keep]).any()


def test_edit_box_keeps_outside_and_matches_uncached(models):
    model, params = models["dalle", True]
    cfg = model.config
    text = _text(cfg)
    given = np.random.RandomState(2).randint(0, cfg.image_vocab_size, (4, cfg.image_len)).astype(np.int32)
    keep = sampling.box_mask(cfg.grid, (1, 1, 3, 3))      # a 2x2 box in the middle of the 4x4 grid
    assert (~keep).sum() == 4 and not keep.reshape(4, 4)[1:3, 1:3].any()
    kw = dict(num_samples=2, top_k=TOP_K, temperature=1.0, fixed_tokens=given, fixed_mask=keep)
    a = np.asarray(sampling.sample(model, params, text, 9, **kw))
    np.testing.assert_array_equal(a, sampling.sample_uncached(model, params, text, 9, **kw))
    np.testing.assert_array_equal(a[:, keep], given[:, keep])     # one given image per sample


def test_classifier_free_guidance(models):
    model, params = models["dalle", False]
    cfg = model.config
    text = _text(cfg)
    kw = dict(num_samples=2, top_k=TOP_K, temperature=1.0)
    a = sampling.sample(model, params, text, 4, guidance_scale=3.0, **kw)
    b = sampling.sample_uncached(model, params, text, 4, guidance_scale=3.0, **kw)
    np.testing.assert_array_equal(a, b)
    plain = sampling.sample(model, params, text, 4, **kw)
    assert (np.asarray(a) != np.asarray(plain)).any()
    # scale 0 keeps only the unconditional logits: the same as sampling from the empty caption
    uncond = sampling.sample(model, params, text, 4, guidance_scale=0.0, **kw)
    null = np.repeat(sampling.empty_caption(cfg), 2, axis=0)
    np.testing.assert_array_equal(uncond, sampling.sample(model, params, null, 4, **kw))
    # scale 1 is plain conditional sampling
    np.testing.assert_array_equal(plain, sampling.sample(model, params, text, 4, guidance_scale=1.0, **kw))


def test_filter_and_sample_logits():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    neg = jnp.finfo(jnp.float32).min
    kept = lambda x: np.asarray(x > neg / 2)  # noqa: E731
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_k=2))[0], [1, 0, 1, 0])
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.75))[0], [1, 0, 1, 0])
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.81))[0], [1, 0, 1, 1])
    np.testing.assert_array_equal(kept(sampling.filter_logits(logits, top_p=0.4))[0], [1, 0, 0, 0])
    assert kept(sampling.filter_logits(logits, top_p=1.0)).all()
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(sampling.sample_logits(key, logits, temperature=0.0), [0, 0])
    draws = jax.vmap(lambda k: sampling.sample_logits(k, logits[:1], 1.0, top_k=2))(jax.random.split(key, 400))
    assert set(np.unique(np.asarray(draws))) == {0, 2}
    frac = float((draws == 0).mean())
    assert 0.5 < frac < 0.75     # 0.5 / 0.8 = 0.625 after renormalising over the top 2


def test_bad_sampling_inputs(models):
    model, params = models["dalle", False]
    cfg = model.config
    text = _text(cfg)
    with pytest.raises(ValueError, match=r"text must be \(batch, 6\)"):
        sampling.sample(model, params, text[:, :4], 0)
    with pytest.raises(ValueError, match="go together"):
        sampling.sample(model, params, text, 0, fixed_tokens=np.zeros((2, 16), np.int32))
    with pytest.raises(ValueError, match="fixed_tokens has 3 rows"):
        sampling.sample(model, params, text, 0, fixed_tokens=np.zeros((3, 16), np.int32),
                        fixed_mask=np.ones(16, bool))
    with pytest.raises(ValueError, match="top_p must lie in"):
        sampling.sample(model, params, text, 0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        sampling.sample(model, params, text, 0, top_k=-1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sampling.sample(model, params, text, 0, num_samples=0)
    with pytest.raises(ValueError, match="keep_rows must lie in"):
        sampling.completion_mask(4, 5)
    with pytest.raises(ValueError, match="box"):
        sampling.box_mask(4, (2, 0, 2, 3))


# ----------------------------------------------------------------------------- rerank
@pytest.fixture(scope="module")
def tiny_clip():
    from clipjax.models import create_model
    clip = create_model("tiny-vit")
    s = clip.config.vision.image_size
    variables = clip.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, 77), jnp.int32))
    return clip, nn.meta.unbox(variables)


def test_rerank_orders_by_clip_similarity(tiny_clip):
    from clipjax.models.clip import CLIP
    from dallejax.rerank import clip_preprocess, clip_scores, rerank
    clip, variables = tiny_clip
    images = np.random.RandomState(0).rand(6, 16, 16, 3).astype(np.float32)
    tokens = np.zeros((1, 77), np.int32)
    tokens[0, :4] = [49406, 320, 1929, 49407]
    order, scores = rerank(clip, variables, images, tokens, keep=3)
    pixels = clip_preprocess(images, clip.config.vision.image_size)
    assert pixels.shape == (6, 32, 32, 3)
    img = clip.apply(variables, pixels, normalize=True, method=CLIP.encode_image)
    txt = clip.apply(variables, tokens, normalize=True, method=CLIP.encode_text)
    want = np.asarray(img @ txt[0])
    np.testing.assert_allclose(clip_scores(clip, variables, images, tokens[0]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(order, np.argsort(-want)[:3])
    np.testing.assert_allclose(scores, np.sort(want)[::-1][:3], rtol=1e-5, atol=1e-6)
    assert scores[0] >= scores[1] >= scores[2]
    with pytest.raises(ValueError, match="keep must lie in"):
        rerank(clip, variables, images, tokens, keep=7)


# ----------------------------------------------------------------------------- generate helpers + CLI
def test_grid_box_and_weights_roundtrip(tmp_path, models):
    from dallejax import generate
    images = np.zeros((5, 4, 6, 3), np.float32)
    images[1] = 1.0
    grid = generate.make_grid(images, cols=3, pad=2)
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3) and grid.dtype == np.uint8
    assert (grid[2:6, 10:16] == 255).all() and (grid[2:6, 2:8] == 0).all()
    assert (grid[8:12, 18:24] == 255).all()      # the 6th cell is empty padding
    assert generate.pixel_box_to_tokens((0, 0, 8, 8), 32, 4) == (0, 0, 1, 1)
    assert generate.pixel_box_to_tokens((9, 3, 17, 32), 32, 4) == (1, 0, 3, 4)
    with pytest.raises(ValueError, match="--box"):
        generate.pixel_box_to_tokens((5, 0, 5, 3), 32, 4)
    _, params = models["dalle", False]
    path = str(tmp_path / "w.msgpack")
    generate.save_variables(path, params)
    loaded = generate.load_variables(path)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="does not exist"):
        generate.load_variables(str(tmp_path / "missing.msgpack"))


def test_load_variables_from_trainer_checkpoint(tmp_path):
    from clipjax.checkpoint import Checkpointer
    from clipjax.trainer import TrainState
    from dallejax import generate
    cfg = DalleConfig(attention="dalle", **BASE)
    model = DalleTransformer(cfg)
    boxed = model.init(jax.random.PRNGKey(0), _text(cfg), np.zeros((2, cfg.image_len), np.int32))["params"]
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=boxed, opt_state=(), model_state={}, ema_params=None,
                       nonfinite_count=zero, first_nonfinite_step=zero)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(3, state, {"task": "dalle"}, force=True)
    ckpt.close()
    loaded = generate.load_variables(str(tmp_path))
    want = nn.meta.unbox(boxed)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def _cli(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dallejax.generate",
                           f"--config={ROOT}/configs/dalle/tiny.py"] + args,
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)


def test_generate_cli_completion_rerank_writes_grid(tmp_path):
    from PIL import Image
    Image.fromarray((np.random.RandomState(0).rand(12, 10, 3) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "grid.png"
    r = _cli(["--checkpoint=random", "--dvae-checkpoint=random", "--prompt=a red square", "--num=3",
              "--batch=2", "--complete=in.png", "--keep-rows=1", "--top-k=4", "--rerank-with=random",
              "--clip-model=tiny-vit", "--keep=2", f"--out={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 2 images" in r.stdout
    scores = [float(v) for v in r.stdout.split("clip scores:")[1].splitlines()[0].split()]
    assert len(scores) == 2 and scores[0] >= scores[1]
    img = np.asarray(Image.open(out))
    assert img.shape == (10 + 2, 2 * 10 + 2, 3)      # 1x2 grid of 8 px images, 2 px padding


def test_generate_cli_user_errors_are_one_line(tmp_path):
    r = _cli(["--checkpoint=random", "--dvae-checkpoint=random", "--prompt=x", "--edit=in.png",
              "--complete=in.png"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: use either --complete or --edit, not both"
    r = _cli(["--checkpoint=nope.msgpack", "--dvae-checkpoint=random", "--prompt=x"], tmp_path)
    assert r.returncode == 2 and "checkpoint 'nope.msgpack' does not exist" in r.stderr.strip().splitlines()[-1]
