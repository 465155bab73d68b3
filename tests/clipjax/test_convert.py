"""open_clip <-> clipjax conversion: parity on random weights, export round trip, error reporting.

Reference models are open_clip on random init with *every* tensor perturbed (open_clip zero-inits
attention biases and the last BN scale of each bottleneck, which would hide mapping mistakes).
"""
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clipjax import convert  # noqa: E402
from clipjax.models import CLIP, create_model, get_model_config  # noqa: E402

TOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- helpers
def _open_clip_model(cfg):
    """An open_clip CLIP with the architecture of a clipjax CLIPConfig (random init, perturbed)."""
    import open_clip
    import torch
    v, t = cfg.vision, cfg.text
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        cfg.embed_dim,
        vision_cfg=dict(image_size=v.image_size, layers=v.layers, width=v.width, patch_size=v.patch_size,
                        head_width=v.head_width, mlp_ratio=v.mlp_ratio),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                      layers=t.layers, mlp_ratio=t.mlp_ratio),
        quick_gelu=cfg.quick_gelu, init_logit_bias=cfg.init_logit_bias)
    return _perturb(model).eval()


def _perturb(model):
    import torch
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bn" in name and name.endswith("weight") or "downsample.1.weight" in name:
                p.uniform_(0.5, 1.5)  # BN scales of order 1 so that every residual branch matters
            else:
                p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
    return model


def _state_dict(model):
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _inputs(cfg, batch=3, seed=0):
    rng = np.random.RandomState(seed)
    s = cfg.vision.image_size
    # Different contrast and colour per image: i.i.d. noise images all look alike after pooling.
    images = (rng.randn(batch, s, s, 3) * rng.uniform(0.3, 2.0, (batch, 1, 1, 1))
              + rng.randn(batch, 1, 1, 3)).astype(np.float32)
    tokens = np.zeros((batch, cfg.text.context_length), np.int64)
    for i in range(batch):
        n = 3 + 7 * i
        tokens[i, 0] = 49406
        tokens[i, 1:n + 1] = rng.randint(1, 49000, n)
        tokens[i, n + 1] = 49407
    return images, tokens


def _torch_embed(model, images, tokens):
    import torch
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2), normalize=True).numpy()
        txt = model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
        scale = model.logit_scale.exp().item()
    return img, txt, scale


_JITTED = {}


def _jax_embed(model, variables, images, tokens):
    fn = _JITTED.setdefault(id(model), jax.jit(model.apply))
    out = fn(variables, images, tokens.astype(np.int32))
    return np.asarray(out["image_features"]), np.asarray(out["text_features"]), float(out["logit_scale"])


def _check_parity(ref, got, label):
    (ti, tt, ts), (ji, jt, js) = ref, got
    di, dt = np.abs(ti - ji).max(), np.abs(tt - jt).max()
    print(f"\n{label}: max|d img|={di:.2e} max|d txt|={dt:.2e}")
    assert di <= TOL and dt <= TOL, (label, di, dt)
    assert np.isclose(ts, js, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(ts * ti @ tt.T, 1), np.argmax(js * ji @ jt.T, 1))
    np.testing.assert_array_equal(np.argmax(ts * tt @ ti.T, 1), np.argmax(js * jt @ ji.T, 1))
    # The embeddings are not degenerate (a silent all-zeros tower would otherwise pass).
    assert np.abs(ji[0] - ji[1]).max() > 1e-3 and np.abs(jt[0] - jt[1]).max() > 1e-3


# ----------------------------------------------------------------------------- mapping table (no torch)
def test_mapping_names_round_trip():
    paths = ["params/visual/transformer/layers_3/attn/qkv/kernel", "params/text/transformer/layers_11/mlp/fc/bias",
             "params/visual/layer3_5/downsample_bn/scale", "batch_stats/visual/bn2/var",
             "params/visual/attnpool/c_proj/kernel", "params/logit_scale", "params/visual/patch_embed"]
    expected = ["visual.transformer.resblocks.3.attn.in_proj_weight", "transformer.resblocks.11.mlp.c_fc.bias",
                "visual.layer3.5.downsample.1.weight", "visual.bn2.running_var", "visual.attnpool.c_proj.weight",
                "logit_scale", "visual.conv1.weight"]
    for p, e in zip(paths, expected):
        name, _ = convert.jax_to_torch_name(p)
        assert name == e
        assert convert.torch_to_jax_name(name)[0] == p
    with pytest.raises(KeyError):
        convert.torch_to_jax_name("visual.something_new.weight")


def test_transforms_invert():
    rng = np.random.RandomState(0)
    for tr, shape in [(convert.QKV, (8, 3, 2, 4)), (convert.LINEAR_OUT, (2, 4, 8)), (convert.LINEAR, (8, 5)),
                      (convert.CONV, (3, 3, 4, 6)), (convert.FLAT, (3, 2, 4))]:
        a = rng.randn(*shape).astype(np.float32)
        t = tr.to_torch(a)
        np.testing.assert_array_equal(tr.to_jax(t, shape), a)


def test_qkv_layout_matches_in_proj():
    """in_proj rows are [q; k; v], each split into heads: check one known element."""
    d, h, k = 8, 2, 4
    w = np.arange(3 * d * d, dtype=np.float32).reshape(3 * d, d)  # torch (out, in)
    ours = convert.QKV.to_jax(w, (d, 3, h, k))
    # output row for (v, head 1, kv 2) is 2*d + 1*k + 2; input column 5
    assert ours[5, 2, 1, 2] == w[2 * d + 1 * k + 2, 5]


# ----------------------------------------------------------------------------- tiny parity
TINY = [("tiny-vit", {}), ("tiny-vit", {"quick_gelu": True}), ("tiny-vit", {"init_logit_bias": -10.0}),
        ("tiny-rn", {})]


@pytest.fixture(scope="module", params=TINY, ids=lambda p: p[0] + "".join(f"-{k}" for k in p[1]))
def tiny_pair(request):
    name, over = request.param
    cfg = get_model_config(name, **over)
    ref = _open_clip_model(cfg)
    model = create_model(name, **over)
    variables = convert.torch_to_clipjax(_state_dict(ref), model)
    return name, cfg, ref, model, variables


@pytest.mark.parity
def test_tiny_parity(tiny_pair):
    name, cfg, ref, model, variables = tiny_pair
    images, tokens = _inputs(cfg)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(model, variables, images, tokens), name)
    if cfg.init_logit_bias is not None:
        out = _JITTED[id(model)](variables, images, tokens.astype(np.int32))
        assert np.isclose(float(out["logit_bias"]), ref.logit_bias.item(), rtol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("tiny_pair", [p for p in TINY if p[0] != "tiny-rn"], indirect=True,
                         ids=lambda p: p[0] + "".join(f"-{k}" for k in p[1]))
def test_tiny_parity_scanned(tiny_pair):
    # scan stacks transformer blocks: the ViT cases cover both towers.
    name, cfg, ref, _, _ = tiny_pair
    model = create_model(name, scan=True, quick_gelu=cfg.quick_gelu, init_logit_bias=cfg.init_logit_bias)
    variables = convert.torch_to_clipjax(_state_dict(ref), model)
    assert "layers" in variables["params"]["visual"]["transformer"]
    images, tokens = _inputs(cfg, seed=1)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(model, variables, images, tokens), name + " scan")


@pytest.mark.parity
def test_tiny_export_round_trip(tiny_pair, tmp_path):
    """clipjax-side values -> .safetensors -> open_clip strict load -> same embeddings."""
    from safetensors.torch import load_file
    name, cfg, _, model, variables = tiny_pair
    # Move every value away from the converted one, on the clipjax side.
    rng = np.random.RandomState(5)
    variables = jax.tree_util.tree_map(lambda a: (a + 0.01 * rng.randn(*a.shape)).astype(np.float32), variables)
    path = str(tmp_path / "export.safetensors")
    convert.save_open_clip(path, variables)
    ref = _open_clip_model(cfg)  # a fresh reference model; every tensor is overwritten
    missing, unexpected = ref.load_state_dict(load_file(path), strict=True)
    assert not missing and not unexpected
    images, tokens = _inputs(cfg, seed=2)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(model, variables, images, tokens),
                  name + " export")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parity
def test_bad_checkpoint_lists_every_problem(tiny_pair):
    name, cfg, ref, model, _ = tiny_pair
    sd = _state_dict(ref)
    visual = "visual.attnpool.c_proj.bias" if cfg.vision.is_resnet else "visual.ln_post.weight"
    del sd[visual]
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    sd["text_projection"] = np.zeros((7, 3), np.float32)
    sd["ln_final.bias"] = np.zeros((5,), np.float32)
    sd["visual.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(convert.ConversionError) as info:
        convert.torch_to_clipjax(sd, model)
    msg = str(info.value)
    for needle in [visual, "transformer.resblocks.1.mlp.c_fc.bias",
                   f"text_projection: expected ({cfg.text.width}, {cfg.embed_dim}), got (7, 3)",
                   f"ln_final.bias: expected ({cfg.text.width},), got (5,)", "visual.extra.weight"]:
        assert needle in msg, msg
    assert len(info.value.missing) == 2 and len(info.value.mismatched) == 2 and len(info.value.unexpected) == 1


def test_wrong_architecture_fails_with_shapes():
    # A tiny-vit checkpoint (made by clipjax itself, no torch needed) loaded into tiny-rn.
    sd = convert.clipjax_to_torch(_random_variables(create_model("tiny-vit")))
    with pytest.raises(convert.ConversionError, match=r"missing \(\d+\)") as info:
        convert.torch_to_clipjax(sd, create_model("tiny-rn"))
    assert "visual.attnpool.positional_embedding" in str(info.value)
    assert "visual.conv1.weight: expected (8, 3, 3, 3), got (64, 3, 8, 8)" in str(info.value) or \
        "visual.conv1.weight" in str(info.value)


def test_infer_config_and_msgpack_round_trip(tmp_path):
    for name in ["tiny-vit", "tiny-rn"]:
        model = create_model(name)
        s = model.config.vision.image_size
        variables = _random_variables(model)
        sd = convert.clipjax_to_torch(variables)
        cfg = convert.infer_config(sd, quick_gelu=False)
        # tiny configs use head_width 16/32, which cannot be read from weights (open_clip assumes 64).
        assert cfg.vision.width == model.config.vision.width and cfg.vision.layers == model.config.vision.layers
        assert cfg.vision.image_size == s and cfg.embed_dim == model.config.embed_dim
        path = str(tmp_path / f"{name}.msgpack")
        convert.save_clipjax(path, variables, model.config, name)
        cfg2, back, stored = convert.load_clipjax(path)
        assert cfg2 == model.config and stored == name
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
    full = convert.infer_config({k: np.zeros(s) for k, s in _shapes_of("ViT-B-32").items()}, quick_gelu=True)
    assert convert.find_model_name(full) == "ViT-B-32-quickgelu"
    full = convert.infer_config({k: np.zeros(s) for k, s in _shapes_of("RN50").items()}, quick_gelu=False)
    assert convert.find_model_name(full) == "RN50"
    with pytest.raises(ValueError, match="Cannot infer"):
        convert.infer_config({"foo": np.zeros(3)})


def _random_variables(model, seed=0):
    rng = np.random.RandomState(seed)
    return convert._unflatten({p: np.asarray(rng.randn(*s), np.float32)
                               for p, s in convert.variable_shapes(model).items()})


def _shapes_of(name):
    """open_clip-name -> shape for a registry model, from shapes only (no init compute)."""
    model = create_model(name)
    out = {}
    for path, shape in convert.variable_shapes(model).items():
        tname, tr = convert.jax_to_torch_name(path)
        out[tname] = tuple(tr.to_torch(np.empty(shape, np.float32)).shape) if len(shape) > 0 else ()
    return out


def test_cli_direction_errors(tmp_path):
    with pytest.raises(ValueError, match="direction"):
        convert.convert_file("a.pt", str(tmp_path / "b.bin"))


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean")
def test_cli_state_dict_and_torchscript(tmp_path):
    """CLI on a torch.save state dict (read without torch) and on a TorchScript archive (torch.jit)."""
    import torch
    cfg = get_model_config("tiny-vit", quick_gelu=True)
    ref = _open_clip_model(cfg)
    sd_path = str(tmp_path / "tiny.pt")
    torch.save(ref.state_dict(), sd_path)
    dst = str(tmp_path / "tiny.msgpack")
    res = subprocess.run([sys.executable, "-m", "clipjax.convert", "--model=tiny-vit", "--quick_gelu",
                          f"--src={sd_path}", f"--dst={dst}"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tiny-vit" in res.stdout
    cfg2, variables, _ = convert.load_clipjax(dst)
    assert cfg2.quick_gelu
    images, tokens = _inputs(cfg, seed=3)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(CLIP(cfg2), variables, images, tokens), "cli .pt")

    # TorchScript (OpenAI release format): architecture inferred, QuickGELU assumed.
    traced = torch.jit.trace_module(ref, {"encode_image": (torch.zeros(1, 3, 32, 32),)}, check_trace=False)
    jit_path = str(tmp_path / "tiny_jit.pt")
    torch.jit.save(traced, jit_path)
    assert convert._is_torchscript(jit_path) and not convert._is_torchscript(sd_path)
    sd = convert.read_checkpoint(jit_path)
    cfg3 = convert.infer_config(sd, quick_gelu=True)
    model = CLIP(dataclass_replace_heads(cfg3, cfg))
    variables = convert.torch_to_clipjax(sd, model)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(model, variables, images, tokens), "torchscript")

    # export back through the CLI
    out = str(tmp_path / "back.safetensors")
    print(convert.convert_file(dst, out))
    from safetensors.numpy import load_file
    back = load_file(out)
    for k, v in _state_dict(ref).items():
        np.testing.assert_array_equal(back[k], v)


def dataclass_replace_heads(inferred, true_cfg):
    """Inference assumes 64-wide heads (as OpenAI's models); the tiny test models use narrower ones."""
    import dataclasses
    return dataclasses.replace(inferred, vision=dataclasses.replace(inferred.vision,
                                                                   head_width=true_cfg.vision.head_width),
                               text=dataclasses.replace(inferred.text, heads=true_cfg.text.heads))


# ----------------------------------------------------------------------------- full size (slow)
FULL = ["ViT-B-32", "ViT-B-16", "RN50"]


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_parity_and_export(name, tmp_path):
    """open_clip.create_model(name) random init -> clipjax (one forward each) -> export -> strict load."""
    import open_clip
    from safetensors.torch import load_file
    import torch
    torch.manual_seed(0)
    ref = _perturb(open_clip.create_model(name)).eval()
    sd = _state_dict(ref)
    cfg = get_model_config(name)
    model = create_model(name, scan=not cfg.vision.is_resnet)  # scan: compile each tower's block once
    variables = convert.torch_to_clipjax(sd, model)
    images, tokens = _inputs(cfg)
    _check_parity(_torch_embed(ref, images, tokens), _jax_embed(model, variables, images, tokens), name)
    # Export -> strict load into a fresh open_clip model -> every tensor identical to the source.
    path = str(tmp_path / "export.safetensors")
    convert.save_open_clip(path, variables)
    fresh = open_clip.create_model(name)
    fresh.load_state_dict(load_file(path), strict=True)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)


# ----------------------------------------------------------------------------- api
def test_api_load_and_zero_shot(tmp_path):
    from PIL import Image

    from clipjax import api
    model, variables, preprocess, tokenizer = api.load("tiny-vit")
    img = preprocess(Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), np.uint8)))
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    tok = tokenizer(["a photo of a cat"])
    assert tok.shape == (1, 77) and tok[0, 0] == 49406

    path = str(tmp_path / "tiny.msgpack")
    convert.save_clipjax(path, variables, model.config, "tiny-vit")
    model2, v2, _, _ = api.load(None, path)
    assert model2.config == model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, v2, variables)
    with pytest.raises(ValueError, match="differs from 'tiny-rn'"):
        api.load("tiny-rn", path)
    sf = str(tmp_path / "tiny.safetensors")
    convert.save_open_clip(sf, variables)
    _, v3, _, _ = api.load("tiny-vit", sf)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v3, variables)
    _, v4, _, _ = api.load("tiny-vit", sf, scan=True)
    assert "layers" in v4["params"]["text"]["transformer"]

    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", lambda c: f"a blurry {c}"]
    head = api.zero_shot_classifier(model, variables, tokenizer, classes, templates, batch_size=4)
    assert head.shape == (model.config.embed_dim, 3)
    np.testing.assert_allclose(np.linalg.norm(head, axis=0), 1, rtol=1e-5)
    # manual reference for the second class
    txt = jax.jit(lambda v, t: model.apply(v, t, normalize=True, method=CLIP.encode_text))(
        variables, tokenizer(["a photo of a dog.", "a blurry dog"]))
    ref = np.asarray(txt).mean(0)
    np.testing.assert_allclose(head[:, 1], ref / np.linalg.norm(ref), atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        api.zero_shot_classifier(model, variables, tokenizer, [], templates)


def test_trim_padding_is_exact():
    from clipjax.models.text import trim_padding
    tokens = np.zeros((3, 77), np.int32)
    tokens[:, 0] = 49406
    tokens[0, 1:4], tokens[0, 4] = 5, 49407
    tokens[1, 1:20], tokens[1, 20] = 6, 49407
    assert trim_padding(tokens).shape == (3, 32)
    assert trim_padding(tokens, multiple=8).shape == (3, 24)
    np.testing.assert_array_equal(trim_padding(tokens)[:, :21], tokens[:, :21])
    full = np.zeros((1, 77), np.int32)
    full[0, -1] = 49407
    assert trim_padding(full).shape == (1, 77)


# ----------------------------------------------------------------------------- preprocess + model end to end
@pytest.mark.parity
def test_preprocess_to_embedding_matches_open_clip():
    """Real photos: our preprocess + clipjax vs open_clip's transform + open_clip: cosine >= 0.999."""
    import open_clip
    import torch
    from PIL import Image
    from skimage import data as skdata

    from clipjax.preprocess import preprocess_image, tf_preprocess_eval
    cfg = get_model_config("tiny-vit", vision_image_size=224, vision_patch_size=32)
    ref = _open_clip_model(cfg)
    model = CLIP(cfg)
    variables = convert.torch_to_clipjax(_state_dict(ref), model)
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.camera(), skdata.rocket()]
    transform = open_clip.image_transform(224, is_train=False)
    theirs = torch.stack([transform(Image.fromarray(p)) for p in photos])
    ours = np.stack([preprocess_image(Image.fromarray(p), 224) for p in photos])
    ours_tf = np.stack([np.asarray(tf_preprocess_eval(np.asarray(Image.fromarray(p).convert("RGB")), 224))
                        for p in photos])
    with torch.no_grad():
        t = ref.encode_image(theirs, normalize=True).numpy()
    enc = jax.jit(lambda v, x: model.apply(v, x, normalize=True, method=CLIP.encode_image))
    for label, batch in [("PIL", ours), ("tf.data", ours_tf)]:
        cos = np.sum(np.asarray(enc(variables, batch)) * t, axis=-1)
        print(f"\npreprocess {label} -> embedding cosine vs open_clip: min {cos.min():.6f}")
        assert cos.min() >= 0.999, (label, cos)
