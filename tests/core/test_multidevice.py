"""The toy task on 8 fake CPU devices (in a subprocess, so this process keeps 1 device).

1-device vs fsdp=8 vs data=2 x fsdp=2 x tensor=2: same losses and params (f32, 1e-5); fsdp=8
really splits parameter and optimizer bytes 8 ways; a checkpoint saved under fsdp=8 restores
under another mesh and on 1 device with identical values.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    from clipjax import trainer as T, parallel
    from clipjax.toy import make_task
    from configs.toy import mlp

    def cfg(data, fsdp, tensor):
        c = mlp.get_config()
        c.total_steps, c.train.log_every, c.train.eval_every = 8, 1, 0
        c.checkpoint.async_save = False
        c.model.hidden = 64
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        return c

    out = {"devices": jax.device_count()}
    runs = {}
    for name, shape, n in [("single", (1, 1, 1), 1), ("data8", (8, 1, 1), 8), ("fsdp8", (1, 8, 1), 8),
                           ("d2f2t2", (2, 2, 2), 8)]:
        c = cfg(*shape)
        mesh = parallel.make_mesh(c.mesh, jax.devices()[:n])
        wd = sys.argv[1] + "/" + name if name == "fsdp8" else ""
        losses = []
        task = make_task(c)
        res = T.train(task, c, wd, mesh=mesh)
        runs[name] = res
        out[name + "_loss"] = res.last_metrics["loss"]
        out[name + "_params"] = [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(res.state.params))]
        if name == "fsdp8":
            per_dev = parallel.bytes_per_device((res.state.params, res.state.opt_state))
            total = sum(x.nbytes for x in jax.tree.leaves((res.state.params, res.state.opt_state)))
            out["fsdp8_share"] = [v / total for v in per_dev.values()]
            out["fsdp8_param_specs"] = {k: str(v.sharding.spec) for k, v in
                                        zip(["fc1_bias", "fc1_kernel"], jax.tree.leaves(res.state.params)[:2])}
    # restore the fsdp=8 checkpoint onto other meshes
    for name, shape, n in [("restore_d2f2t2", (2, 2, 2), 8), ("restore_single", (1, 1, 1), 1)]:
        c = cfg(*shape)
        mesh = parallel.make_mesh(c.mesh, jax.devices()[:n])
        st = T.restore_state(c, sys.argv[1] + "/fsdp8", mesh=mesh)
        out[name + "_params"] = [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(st.params))]
        out[name + "_ndev"] = len(jax.tree.leaves(st.params)[1].sharding.device_set)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    wd = tmp_path_factory.mktemp("md")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(wd)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0, r.stderr[-4000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _close(a, b, tol):
    import numpy as np
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=0)


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2"])
def test_sharded_equals_single_device(result, mesh):
    assert result["devices"] == 8
    assert abs(result[mesh + "_loss"] - result["single_loss"]) <= 1e-5
    _close(result[mesh + "_params"], result["single_params"], 1e-5)


def test_fsdp_splits_params_and_optimizer_state(result):
    shares = result["fsdp8_share"]
    assert len(shares) == 8
    # Biases of width 8 (the head) are split too; only scalars (step counts) are replicated.
    for s in shares:
        assert abs(s - 1 / 8) <= 0.05 / 8, shares
    assert "fsdp" in result["fsdp8_param_specs"]["fc1_kernel"]


@pytest.mark.parametrize("target", ["restore_d2f2t2", "restore_single"])
def test_checkpoint_restores_on_other_mesh(result, target):
    _close(result[target + "_params"], result["fsdp8_params"], 0)
    assert result[target + "_ndev"] == (8 if "d2f2t2" in target else 1)
