"""The shared trainer on the toy task: learning, exact resume, accumulation, non-finite handling."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clipjax import checkpoint as ckpt_lib
from clipjax import trainer as trainer_lib
from clipjax.toy import make_task
from configs.toy import mlp


def _config(**kw):
    c = mlp.get_config()
    c.total_steps = kw.pop("total_steps", 40)
    c.checkpoint.async_save = False
    c.update_from_flattened_dict(kw)
    return c


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    c = _config()
    wd = str(tmp_path_factory.mktemp("full"))
    return trainer_lib.train(make_task(c), c, wd), wd


def test_loss_decreases_and_evaluates(full_run):
    res, wd = full_run
    assert res.status == "done" and int(res.state.step) == 40
    assert res.last_metrics["loss"] < 0.6 * 0.43  # first logged window was ~0.43
    assert res.eval_metrics["heldout/mse"] < 0.2
    assert os.path.isdir(os.path.join(wd, "checkpoints", "40"))


def test_restart_continues_bitwise(full_run, tmp_path):
    res_full, _ = full_run
    # Same 40-step config; the first run dies (input exception) right after step 20's checkpoint.
    c = _config(total_steps=40)
    task = make_task(c)
    inner = task.data

    def data_then_stop(start, pi, pc):
        it = inner(start, pi, pc)
        for i, b in enumerate(it):
            if start + i >= 20:
                raise KeyboardInterrupt
            yield b
    task.data = data_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer_lib.train(task, c, str(tmp_path))
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 20
    res = trainer_lib.train(make_task(c), c, str(tmp_path))
    assert res.start_step == 20 and int(res.state.step) == 40
    _assert_trees_equal(_params(res.state), _params(res_full.state))


def test_grad_accumulation_matches_full_batch(full_run, tmp_path):
    c = _config(grad_accum_steps=4, total_steps=40)
    res = trainer_lib.train(make_task(c), c, str(tmp_path))
    for a, b in zip(jax.tree.leaves(_params(res.state)), jax.tree.leaves(_params(full_run[0].state))):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_nonfinite_skip_counts(tmp_path):
    c = _config(total_steps=10, **{"model.nan_at_step": 3, "train.log_every": 5})
    res = trainer_lib.train(make_task(c), c, str(tmp_path))
    assert int(res.state.nonfinite_count) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(res.state)))


def test_nonfinite_error_names_step(tmp_path):
    c = _config(total_steps=30, **{"model.nan_at_step": 13, "train.nonfinite": "error",
                                  "checkpoint.every_steps": 10, "train.log_every": 5})
    with pytest.raises(trainer_lib.NonFiniteError, match="at step 13"):
        trainer_lib.train(make_task(c), c, str(tmp_path))
    # The last good checkpoint is kept, and nothing after the bad step was saved.
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 10


def test_other_model_in_workdir_refused(full_run, tmp_path):
    _, wd = full_run
    c = _config(**{"model.hidden": 32})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"model shape changed.*fc1/kernel"):
        trainer_lib.train(make_task(c), c, wd)
    task = make_task(_config())
    task.name = "another-model"
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="holds a checkpoint of 'toy-mlp'"):
        trainer_lib.train(task, _config(), wd)


# ---- the CLI, killed and preempted -----------------------------------------------------------
def _start(workdir, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "clipjax.toy", "--config=configs/toy/mlp.py", f"--workdir={workdir}",
         "--config.total_steps=120", "--config.checkpoint.every_steps=20", "--config.train.log_every=20",
         "--config.model.data_delay_s=0.01", "--config.train.eval_every=0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(workdir, min_step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() \
            if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
        if any(s >= min_step for s in steps):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def _final_params(workdir):
    c = mlp.get_config()
    c.total_steps = 120
    return _params(trainer_lib.restore_state(c, workdir))


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref"))
    p = _start(wd)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return _final_params(wd)


def test_sigkill_then_rerun_is_bitwise_identical(cli_reference, tmp_path):
    wd = str(tmp_path)
    p = _start(wd)
    _wait_for_checkpoint(wd, 40, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
    assert 40 <= killed_at < 120
    p = _start(wd)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "done at step 120" in out
    _assert_trees_equal(_final_params(wd), cli_reference)


def test_sigterm_saves_and_exits_zero(cli_reference, tmp_path):
    wd = str(tmp_path)
    p = _start(wd)
    _wait_for_checkpoint(wd, 20, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "preempted at step" in out
    step = int(out.split("preempted at step")[1].split(":")[0])
    assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).latest_step() == step
    p = _start(wd)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "done at step 120" in out, err[-3000:]
    _assert_trees_equal(_final_params(wd), cli_reference)
