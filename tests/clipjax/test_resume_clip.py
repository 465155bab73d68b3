"""Preemption safety of real CLIP training (tiny ViT on digits, through the CLI).

SIGKILL at three random moments — one of them while a checkpoint is being written — and a rerun
after each: the final parameters are bitwise equal to an uninterrupted run, and the optimizer
applied exactly the configured number of updates. SIGTERM: exit 0 with a checkpoint at the
current step, and the rerun finishes identically.
"""
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL = 48
ARGS = ["--config=configs/clip/digits_tiny.py", f"--config.total_steps={TOTAL}", "--config.batch_size=32",
        "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=2", "--config.train.log_every=4",
        "--config.optim.warmup_steps=4", "--config.train.progress_bar=False", "--config.model.count_flops=False",
        "--config.eval.zero_shot=False", "--config.eval.retrieval=False", "--config.eval.linear_probe=False"]


def _start(workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "clipjax.train", f"--workdir={workdir}", *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _ckpt_entries(workdir):
    d = os.path.join(workdir, "checkpoints")
    return os.listdir(d) if os.path.isdir(d) else []


def _done_steps(workdir):
    return sorted(int(e) for e in _ckpt_entries(workdir) if e.isdigit())


def _finish(workdir):
    p = _start(workdir)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-4000:]
    assert f"done at step {TOTAL}" in out
    return out


def _state(workdir):
    from absl import flags
    from clipjax import trainer
    from configs.clip import digits_tiny
    c = digits_tiny.get_config()
    c.total_steps, c.batch_size = TOTAL, 32
    c.model.count_flops = False
    return trainer.restore_state(c, workdir)


def _count(opt_state):
    counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if "count" in jax.tree_util.keystr(p)]
    assert counts, "optimizer state has no step count"
    return max(counts)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("clip_ref"))
    _finish(wd)
    return _state(wd)


@pytest.mark.slow
def test_sigkill_three_times_is_bitwise_identical(reference, tmp_path):
    wd = str(tmp_path)
    rng = random.Random(1234)
    kills = []
    # 1-2: random moments after training has started (at least one checkpoint written).
    for _ in range(2):
        p = _start(wd)
        start = time.time()
        while not _done_steps(wd) or (kills and max(_done_steps(wd)) <= kills[-1][1]):
            assert p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(("random", max(_done_steps(wd))))
    # 3: while a checkpoint is being written (orbax's temporary directory exists).
    p = _start(wd)
    in_write = False
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 600:
        if any("tmp" in e for e in _ckpt_entries(wd)):
            p.send_signal(signal.SIGKILL)
            in_write = True
            break
        time.sleep(0.002)
    p.wait()
    assert in_write, "never saw a checkpoint write in progress"
    latest = max(_done_steps(wd))
    kills.append(("in_write", latest))
    assert latest < TOTAL, kills
    # The interrupted save never became a checkpoint; the rerun resumes and finishes.
    out = _finish(wd)
    state = _state(wd)
    assert int(state.step) == TOTAL and _count(state.opt_state) == TOTAL
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _count(reference.opt_state) == TOTAL


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(reference, tmp_path):
    wd = str(tmp_path)
    p = _start(wd)
    while not _done_steps(wd):
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    step = int(out.split("preempted at step")[1].split(":")[0])
    assert max(_done_steps(wd)) == step
    _finish(wd)
    state = _state(wd)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
