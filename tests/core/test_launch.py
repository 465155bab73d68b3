"""Launch scripts: --dry-run output has the right worker selection, env and entry point; and a
real 2-process x 4-device run on localhost (jax.distributed + gloo) equals 1 process x 8 devices."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dry(script, *args):
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tpu_pod_dry_run():
    out = _dry("tpu_pod.sh", "--name", "pod1", "--zone", "us-central2-b", "--accelerator", "v4-32",
               "--entry", "clipjax.train", "--config", "configs/clip/vit_b16.py", "--workdir", "gs://b/run",
               "--", "--config.batch_size=32768")
    assert "tpu-vm create pod1 --accelerator-type=v4-32" in out
    ssh = [l for l in out.splitlines() if "tpu-vm ssh" in l]
    assert ssh and all("--worker=all" in l for l in ssh)
    run = ssh[-1].replace("\\", "")
    assert "CLIPJAX_DISTRIBUTED=1" in run and "python -m clipjax.train" in run
    assert "--config=configs/clip/vit_b16.py" in run and "--workdir=gs://b/run" in run
    assert "--config.batch_size=32768" in run
    assert "pip install -q -e 'clipjax[tpu]'" in out.replace("\\", "")


def test_tpu_queued_resource_and_delete():
    out = _dry("tpu_pod.sh", "--name", "big", "--zone", "us-west4-a", "--accelerator", "v5litepod-256",
               "--queued", "--spot", "--step", "create")
    assert re.search(r"queued-resources create big --node-id=big --accelerator-type=v5litepod-256.*--spot", out)
    out = _dry("tpu_pod.sh", "--name", "big", "--zone", "us-west4-a", "--accelerator", "v5litepod-256",
               "--queued", "--step", "delete")
    assert "queued-resources delete big" in out


def test_slurm_dry_run():
    out = _dry("gpu_slurm.sbatch", "--nodes", "2", "--gpus-per-node", "8", "--entry", "dallejax.train_dalle",
               "--config", "configs/dalle/tiny.py", "--workdir", "/shared/run")
    assert "sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in out
    srun = [l for l in out.splitlines() if "srun" in l][0]
    assert "CLIPJAX_DISTRIBUTED=1" in srun and "--gpus-per-task=1" in srun
    assert "python -m dallejax.train_dalle --config=configs/dalle/tiny.py --workdir=/shared/run" in srun
    assert "16 tasks" in out


def test_missing_required_flag_is_clear():
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry-run", "--name", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: --zone is required" in r.stderr


def _final_loss(stdout):
    m = re.search(r"done at step (\d+): loss=([0-9.]+)", stdout)
    assert m, stdout[-2000:]
    return int(m.group(1)), float(m.group(2))


# Real multi-process runs go through tests/core/launch_probe.py: it runs the named entry point
# unchanged and records, per process, the full-precision final loss, a fingerprint of every row
# of every host-local batch, and (process 0) the final train state gathered across processes.
_MULTI = {
    "toy": dict(entry="clipjax.toy", config="configs/toy/mlp.py", steps=10, key="x", overrides=[
        "--config.total_steps=10", "--config.train.log_every=10", "--config.train.eval_every=0",
        "--config.checkpoint.every_steps=5"]),
    # Tiny CLIP on the digits built-in (global mode: each process reads its own slice of every
    # global batch). SGD + momentum as in test_models_multidevice: Adam would turn reduction-order
    # noise (gloo vs in-process all-reduce) in near-zero gradients into lr-sized updates.
    "clip": dict(entry="clipjax.train", config="configs/clip/digits_tiny.py", steps=5, key="images", overrides=[
        "--config.total_steps=5", "--config.batch_size=16", "--config.train.log_every=5",
        "--config.train.progress_bar=False", "--config.eval.zero_shot=False", "--config.eval.retrieval=False",
        "--config.eval.linear_probe=False", "--config.model.count_flops=False", "--config.optim.name=sgd",
        "--config.optim.lr=0.05", "--config.optim.b1=0.9", "--config.optim.warmup_steps=1",
        "--config.checkpoint.every_steps=0"]),
}


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _launch(args, env, timeout=600):
    """launch/local.sh in its own session: on a timeout the whole group (bash + the python processes
    it started) is killed, so no worker outlives the test."""
    import signal
    proc = subprocess.Popen(["bash", "launch/local.sh", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch/local.sh {' '.join(args)} ran past {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_local_dry_run_multi_process():
    out = _dry("local.sh", "--processes", "2", "--devices-per-process", "4", "--port", "23456",
               "--entry", "clipjax.train", "--config", "configs/clip/digits_tiny.py", "--workdir", "/tmp/run",
               "--", "--config.total_steps=5")
    lines = [l for l in out.splitlines() if l.startswith("+ env")]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert "JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 python -m clipjax.train" in line
        assert "--config=configs/clip/digits_tiny.py --workdir=/tmp/run" in line
        assert "--config.distributed.initialize=True" in line
        assert "--config.distributed.coordinator_address=localhost:23456" in line
        assert f"--config.distributed.num_processes=2 --config.distributed.process_id={i}" in line
        assert line.endswith("--config.total_steps=5 &")


@pytest.mark.parametrize("failing", [0, 1])
def test_local_one_failing_process_stops_the_others(tmp_path, failing):
    # One process dies after joining jax.distributed; the other would block in its first collective
    # (or, for the coordinator, keep the others waiting). The launcher stops it and returns the
    # failure's status promptly.
    import time
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LAUNCH_PROBE_ENTRY": "clipjax.toy",
           "LAUNCH_PROBE_FAIL_PROCESS": str(failing)}
    t0 = time.monotonic()
    r = _launch(["--processes", "2", "--devices-per-process", "1", "--port", str(_free_port()),
                 "--entry", "tests.core.launch_probe", "--config", "configs/toy/mlp.py", "--workdir", str(tmp_path),
                 "--", "--config.total_steps=3", "--config.optim.warmup_steps=1"], env, timeout=180)
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert f"process {failing} fails on purpose" in r.stderr
    assert "exited with status 3; stopping the other processes" in r.stderr
    assert "done at step" not in r.stdout
    assert elapsed < 60, elapsed


def _probe(workdir):
    import json
    out = {}
    for name in sorted(os.listdir(os.path.join(workdir, "probe"))):
        if name.startswith("process_"):
            with open(os.path.join(workdir, "probe", name)) as f:
                rec = json.load(f)
            out[rec["process_index"]] = rec
    with np.load(os.path.join(workdir, "probe", "state.npz")) as f:
        state = [f[f"arr_{i}"] for i in range(len(f.files))]
    return out, state


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_MULTI))
def test_two_processes_equal_one_process_eight_devices(tmp_path, case):
    spec = _MULTI[case]
    common = ["--entry", "tests.core.launch_probe", "--config", spec["config"], "--",
              "--config.mesh.data=2", "--config.mesh.fsdp=-1", *spec["overrides"]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LAUNCH_PROBE_ENTRY": spec["entry"]}
    two = _launch(["--processes", "2", "--devices-per-process", "4", "--port", str(_free_port()),
                   "--workdir", str(tmp_path / "two"), *common], env)
    assert two.returncode == 0, two.stderr[-4000:]
    one = _launch(["--devices-per-process", "8", "--workdir", str(tmp_path / "one"), *common], env)
    assert one.returncode == 0, one.stderr[-4000:]
    # Only process 0 prints the summary line.
    assert two.stdout.count("done at step") == 1 and one.stdout.count("done at step") == 1
    steps = spec["steps"]
    assert _final_loss(two.stdout)[0] == _final_loss(one.stdout)[0] == steps

    # Both processes ran to the end (each wrote its record), as 2 x 4 devices; the reference as 1 x 8.
    recs2, state2 = _probe(tmp_path / "two")
    recs1, state1 = _probe(tmp_path / "one")
    assert sorted(recs2) == [0, 1] and sorted(recs1) == [0]
    assert all(r["process_count"] == 2 and r["local_devices"] == 4 and r["status"] == "done" for r in recs2.values())
    assert recs1[0]["process_count"] == 1 and recs1[0]["local_devices"] == 8

    # Losses (full precision): every process logs the same global loss, equal to the 1-process run's.
    l0, l1, ref = (recs2[0]["metrics"]["loss"], recs2[1]["metrics"]["loss"], recs1[0]["metrics"]["loss"])
    assert l0 == l1 and abs(l0 - ref) <= 1e-5, (l0, l1, ref)

    # Data: each process read its own rows. At every step process 0 holds the first half of the
    # 1-process global batch and process 1 the second half (every key, bitwise), and no row of one
    # process appears at the other.
    b0, b1, b = recs2[0]["batches"], recs2[1]["batches"], recs1[0]["batches"]
    assert len(b0) == len(b1) == len(b) == steps
    for s in range(steps):
        assert set(b0[s]) == set(b1[s]) == set(b[s])
        for k in b[s]:
            half = len(b[s][k]) // 2
            assert len(b0[s][k]) == len(b1[s][k]) == half
            assert b0[s][k] == b[s][k][:half] and b1[s][k] == b[s][k][half:], (case, s, k)
    rows0 = {h for batch in b0 for h in batch[spec["key"]]}
    rows1 = {h for batch in b1 for h in batch[spec["key"]]}
    assert len(rows0) == len(rows1) == steps * len(b[0][spec["key"]]) // 2 and not rows0 & rows1

    # The final states agree (1e-5), and the 2-process checkpoint restores in a 1-process, 1-device
    # run with exactly the values the 2-process run ended with.
    assert len(state2) == len(state1)
    for x, y in zip(state2, state1):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=case)
    import jax
    from clipjax import parallel, trainer
    c = _load_config(spec["config"], spec["overrides"])
    restored = trainer.restore_state(c, str(tmp_path / "two"), mesh=parallel.make_mesh(c.mesh, jax.devices()[:1]))
    leaves = jax.tree.leaves(restored)
    assert len(leaves) == len(state2)
    assert int(jax.device_get(restored.step)) == steps
    for x, y in zip(leaves, state2):
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=case)


def _load_config(path, overrides):
    """The config a CLI run with ``overrides`` used, on one device."""
    import importlib
    module = importlib.import_module(path[:-3].replace("/", "."))
    c = module.get_config()
    for flag in overrides:
        key, value = flag[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        old = node[leaf]
        node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c
