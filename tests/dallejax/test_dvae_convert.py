"""dallejax.convert: name table round trip, file formats, and parity with the dall_e package."""
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dallejax import convert, dvae

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(group_count=2, n_hid=16, n_blk_per_group=2, vocab_size=32)


@pytest.fixture(scope="module")
def tiny_params():
    enc = nn.meta.unbox(dvae.Encoder(**TINY).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    dec = nn.meta.unbox(dvae.Decoder(n_init=8, **TINY).init(jax.random.key(1), jnp.zeros((1, 4, 4), jnp.int32)))
    return enc, dec


def _assert_trees_equal(a, b):
    fa, fb = convert._flatten(a), convert._flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_name_table_round_trip(tiny_params):
    for variables, kind in zip(tiny_params, ("encoder", "decoder")):
        sd = convert.params_to_torch(variables)
        assert "blocks.input.w" in sd and "blocks.output.conv.b" in sd
        assert "blocks.group_2.block_1.id_path.w" in sd           # width change -> 1x1 skip
        assert "blocks.group_1.block_2.id_path.w" not in sd          # same width -> identity
        assert all(v.ndim == 4 for k, v in sd.items() if k.endswith(".w"))
        assert convert.infer_kind(sd) == kind
        back = convert.torch_to_params(sd)
        _assert_trees_equal(back, variables["params"])
    enc_sd = convert.params_to_torch(tiny_params[0])
    # OIHW in torch vs HWIO here.
    assert enc_sd["blocks.input.w"].shape == (16, 3, 7, 7)
    assert convert.config_from_state_dict(enc_sd) == dict(
        group_count=2, n_blk_per_group=2, n_hid=16, input_channels=3, vocab_size=32)
    dec_sd = convert.params_to_torch(tiny_params[1])
    assert convert.config_from_state_dict(dec_sd) == dict(
        group_count=2, n_blk_per_group=2, n_init=8, vocab_size=32, n_hid=16, output_channels=3)


def test_unknown_names_are_reported(tiny_params):
    sd = dict(convert.params_to_torch(tiny_params[0]))
    sd["blocks.group_1.block_1.res_path.norm.w"] = np.zeros((1, 1, 1, 1))
    with pytest.raises(ValueError, match="res_path.norm.w"):
        convert.torch_to_params(sd)


@pytest.mark.parametrize("ext", ["msgpack", "safetensors"])
def test_save_load_round_trip(tmp_path, tiny_params, ext):
    enc = tiny_params[0]
    cfg = convert.config_from_state_dict(convert.params_to_torch(enc))
    path = tmp_path / f"enc.{ext}"
    convert.save_params(enc, path, "encoder", cfg)
    kind, cfg2, loaded = convert.load_params(path)
    assert kind == "encoder" and cfg2 == cfg
    _assert_trees_equal(loaded["params"], enc["params"])
    model = convert.build_model(kind, cfg2)
    x = jax.random.uniform(jax.random.key(2), (1, 8, 8, 3))
    np.testing.assert_allclose(model.apply(loaded, x), model.apply(enc, x), atol=0)
    with pytest.raises(ValueError, match="msgpack or .safetensors"):
        convert.save_params(enc, tmp_path / "enc.npz", "encoder", cfg)


def test_dvae_variables_combine(tiny_params):
    enc, dec = tiny_params
    model = dvae.DVAE(n_init=8, image_size=8, **TINY)
    v = convert.dvae_variables(enc, dec)
    x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3))
    tokens = model.apply(v, x, method=dvae.DVAE.encode)
    direct = jnp.argmax(dvae.Encoder(**TINY).apply(enc, dvae.map_pixels(x)), -1)
    np.testing.assert_array_equal(tokens, direct)
    assert model.apply(v, tokens, method=dvae.DVAE.decode).shape == x.shape


# ----------------------------------------------------------------------------- parity (torch)
def _torch():
    import torch
    return torch


@pytest.fixture(scope="module")
def full_size_reference():
    torch = _torch()
    import dall_e
    torch.manual_seed(0)
    enc, dec = dall_e.Encoder(), dall_e.Decoder()  # fresh objects: random init, full size
    # The reference zero-inits every bias, which would leave the bias mapping untested, and its
    # decoder input conv (std 1/sqrt(8192) on one-hot codes) makes outputs ~0.01. Randomise
    # the biases and give the decoder input unit std so every activation is O(1).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (enc, dec):
            for name, p in module.named_parameters():
                if name.endswith(".b"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        dec.blocks.input.w.mul_(math.sqrt(8192))
    x = dall_e.map_pixels(torch.rand(2, 3, 256, 256, generator=g))
    tokens = torch.randint(0, 8192, (2, 32, 32), generator=g)
    with torch.no_grad():
        logits = enc(x).numpy()
        stats = dec(torch.nn.functional.one_hot(tokens, 8192).permute(0, 3, 1, 2).float()).numpy()
    return enc, dec, x.numpy(), tokens.numpy(), logits, stats


@pytest.mark.parity
@pytest.mark.slow
def test_full_size_encoder_parity(full_size_reference):
    enc, _, x, _, ref, _ = full_size_reference
    kind, cfg, variables = convert.from_torch_module(enc)
    assert kind == "encoder"
    model = convert.build_model(kind, cfg)
    assert sum(p.numel() for p in enc.parameters()) == sum(
        np.size(a) for a in jax.tree.leaves(variables)) == 53_786_240
    ours = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    delta = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    agree = float(np.mean(ours.argmax(1) == ref.argmax(1)))
    print(f"\nencoder logits: max|delta|={delta:.3g} max|ref|={scale:.3g} std(ref)={ref.std():.3g} "
          f"rel={delta / scale:.3g} argmax agreement={agree:.5f}")
    assert scale > 0.5  # a meaningful scale, not vanishing logits
    assert delta <= 1e-3 and delta / scale <= 1e-4
    assert agree >= 0.999


@pytest.mark.parity
@pytest.mark.slow
def test_full_size_decoder_parity(full_size_reference):
    _, dec, _, tokens, _, ref = full_size_reference
    kind, cfg, variables = convert.from_torch_module(dec)
    assert kind == "decoder"
    assert sum(p.numel() for p in dec.parameters()) == 43_829_766
    model = convert.build_model(kind, cfg)
    ours = np.asarray(jax.jit(model.apply)(variables, tokens)).transpose(0, 3, 1, 2)
    delta = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    print(f"\ndecoder stats: max|delta|={delta:.3g} max|ref|={scale:.3g} std(ref)={ref.std():.3g} "
          f"rel={delta / scale:.3g}")
    assert scale > 0.5
    assert delta <= 1e-3 and delta / scale <= 1e-4
    # The image seen by users: unmap(sigmoid(mu)).
    img = lambda s: np.clip((1 / (1 + np.exp(-s[:, :3])) - 0.1) / 0.8, 0, 1)
    assert float(np.abs(img(ours) - img(ref)).max()) <= 1e-4


_SUBPROCESS_CONVERT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from dallejax import convert
    enc_path, dec_path, io_path, out_path = sys.argv[1:5]
    data = np.load(io_path)
    kind_e, cfg_e, ve = convert.load_openai(enc_path)
    kind_d, cfg_d, vd = convert.load_openai(dec_path)
    assert (kind_e, kind_d) == ("encoder", "decoder"), (kind_e, kind_d)
    logits = convert.build_model(kind_e, cfg_e).apply(ve, jnp.asarray(data["x"]))
    stats = convert.build_model(kind_d, cfg_d).apply(vd, jnp.asarray(data["tokens"]))
    np.savez(out_path, logits=np.asarray(logits), stats=np.asarray(stats))
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "dall_e"))
    assert not bad, bad
    print("OK torch-free", cfg_e, cfg_d)
""")


@pytest.mark.parity
def test_openai_style_pickles_convert_without_torch(tmp_path):
    """torch.save(dall_e module) as OpenAI did -> converter in a fresh process that never
    imports torch -> same outputs as the torch modules."""
    torch = _torch()
    import dall_e
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512)
    dec = dall_e.Decoder(n_hid=64, vocab_size=512)
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    x = dall_e.map_pixels(torch.rand(2, 3, 32, 32))
    tokens = torch.randint(0, 512, (2, 4, 4))
    with torch.no_grad():
        ref_logits = enc(x).numpy()
        ref_stats = dec(torch.nn.functional.one_hot(tokens, 512).permute(0, 3, 1, 2).float()).numpy()
    np.savez(tmp_path / "io.npz", x=x.numpy().transpose(0, 2, 3, 1), tokens=tokens.numpy())
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    args = [str(tmp_path / n) for n in ("encoder.pkl", "decoder.pkl", "io.npz", "out.npz")]
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_CONVERT, *args], capture_output=True,
                          text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK torch-free" in proc.stdout
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["logits"].transpose(0, 3, 1, 2), ref_logits, atol=1e-4)
    np.testing.assert_allclose(out["stats"].transpose(0, 3, 1, 2), ref_stats, atol=1e-5)

    # The CLI, also torch-free, writes a file load_params reads back to the same weights.
    dst = tmp_path / "encoder.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dallejax.convert", f"--src={args[0]}", f"--dst={dst}"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dall_e encoder" in proc.stdout
    kind, cfg, loaded = convert.load_params(dst)
    assert kind == "encoder" and cfg["n_hid"] == 64 and cfg["vocab_size"] == 512
    ref_sd = enc.state_dict()
    ours_sd = convert.params_to_torch(loaded)
    assert sorted(ours_sd) == sorted(ref_sd)
    for k in ref_sd:
        np.testing.assert_array_equal(ours_sd[k], ref_sd[k].numpy())
