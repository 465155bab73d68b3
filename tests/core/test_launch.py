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


@pytest.mark.slow
def test_two_processes_equal_one_process_eight_devices(tmp_path):
    common = ["--entry", "clipjax.toy", "--config", "configs/toy/mlp.py", "--",
              "--config.total_steps=10", "--config.train.log_every=10", "--config.train.eval_every=0",
              "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.checkpoint.every_steps=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = str(20000 + os.getpid() % 20000)
    two = subprocess.run(["bash", "launch/local.sh", "--processes", "2", "--devices-per-process", "4",
                          "--port", port, "--workdir", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert two.returncode == 0, two.stderr[-4000:]
    one = subprocess.run(["bash", "launch/local.sh", "--devices-per-process", "8",
                          "--workdir", str(tmp_path / "one"), *common],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert one.returncode == 0, one.stderr[-4000:]
    # Only process 0 prints the summary line.
    assert two.stdout.count("done at step") == 1
    s2, l2 = _final_loss(two.stdout)
    s1, l1 = _final_loss(one.stdout)
    assert s1 == s2 == 10 and abs(l1 - l2) <= 1e-5
    # The 2-process checkpoint restores in a 1-process run (1 device) with the same values.
    from clipjax import trainer
    from configs.toy import mlp
    c = mlp.get_config()
    c.total_steps = 10
    c.mesh.data = 1
    a = trainer.restore_state(c, str(tmp_path / "two"))
    b = trainer.restore_state(c, str(tmp_path / "one"))
    import jax
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
