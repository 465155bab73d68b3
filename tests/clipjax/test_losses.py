"""Contrastive losses: values against a direct numpy computation, and global-batch correctness
on 8 fake devices (data=8 and fsdp=8) in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import losses


def _feats(n=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float32), b.astype(np.float32)


def _log_softmax(x, axis):
    x = x - x.max(axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis, keepdims=True))


def test_softmax_loss_matches_numpy():
    a, b = _feats()
    s = np.log(1 / 0.07)
    loss, m = losses.softmax_contrastive_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(s))
    logits = (1 / 0.07) * a @ b.T
    ref = -(np.diag(_log_softmax(logits, 1)).mean() + np.diag(_log_softmax(logits, 0)).mean()) / 2
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_logit_scale_clamped_at_100():
    a, b = _feats()
    _, m = losses.softmax_contrastive_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(10.0))
    assert float(m["logit_scale"]) == 100.0


def test_sigmoid_loss_matches_numpy():
    a, b = _feats()
    loss, _ = losses.sigmoid_contrastive_loss(jnp.asarray(a), jnp.asarray(b), jnp.asarray(np.log(10.0)),
                                              jnp.asarray(-10.0))
    logits = 10.0 * a @ b.T - 10.0
    z = 2 * np.eye(16) - 1
    ref = -np.sum(-np.log1p(np.exp(-z * logits))) / 16
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from clipjax import losses, parallel
    from ml_collections import ConfigDict
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 16)).astype(np.float32); a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.normal(size=(32, 16)).astype(np.float32); b /= np.linalg.norm(b, axis=1, keepdims=True)
    s, bias = jnp.asarray(np.log(1 / 0.07), jnp.float32), jnp.asarray(-10.0)
    def both(a, b):
        return (losses.softmax_contrastive_loss(a, b, s)[0], losses.sigmoid_contrastive_loss(a, b, s, bias)[0],
                jax.grad(lambda a: losses.softmax_contrastive_loss(a, b, s)[0])(a))
    out = {}
    ref = jax.jit(both)(a, b)
    out["single"] = [float(ref[0]), float(ref[1])]
    for name, shape in [("data8", dict(data=8, fsdp=1, tensor=1)), ("fsdp8", dict(data=1, fsdp=8, tensor=1))]:
        mesh = parallel.make_mesh(ConfigDict(shape))
        sa, sb = parallel.host_batch_to_global({"a": a, "b": b}, mesh, 32).values()
        assert len(sa.sharding.device_set) == 8
        r = jax.jit(both)(sa, sb)
        out[name] = [float(r[0]), float(r[1])]
        out[name + "_grad_err"] = float(np.abs(np.asarray(r[2]) - np.asarray(ref[2])).max())
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1][6:])


@pytest.mark.parametrize("mesh", ["data8", "fsdp8"])
def test_global_batch_loss_equals_single_device(sharded, mesh):
    for got, ref in zip(sharded[mesh], sharded["single"]):
        assert abs(got - ref) <= 1e-5
    assert sharded[mesh + "_grad_err"] <= 1e-5
