"""Config loading, overrides and validation: errors name the key."""
import subprocess
import sys

import pytest

from clipjax import config as config_lib
from clipjax.config import ConfigError
from configs.toy import mlp


def test_base_config_validates():
    config_lib.validate(mlp.get_config(), num_devices=1)


@pytest.mark.parametrize("mesh, devices, expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=8, tensor=1), 8, (1, 8, 1)),
])
def test_mesh_fill(mesh, devices, expected):
    assert config_lib.resolve_mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize("override, key", [
    (dict(mesh=dict(data=8, fsdp=1, tensor=1)), "config.mesh"),
    (dict(mesh=dict(data=-1, fsdp=-1, tensor=1)), "config.mesh"),
    (dict(mesh=dict(data=3, fsdp=-1, tensor=1)), "config.mesh"),
    (dict(batch_size=0), "config.batch_size"),
    (dict(grad_accum_steps=3), "config.grad_accum_steps"),
    (dict(train=dict(nonfinite="ignore")), "config.train.nonfinite"),
    (dict(optim=dict(schedule="exp")), "config.optim.schedule"),
    (dict(optim=dict(warmup_steps=10**6)), "config.optim.warmup_steps"),
    (dict(task="nocolon"), "config.task"),
])
def test_validation_names_key(override, key):
    c = mlp.get_config()
    for k, v in override.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                c[k][kk] = vv
        else:
            c[k] = v
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(c, num_devices=4 if "mesh" in override else 1)


def test_batch_not_divisible_by_batch_axes():
    c = mlp.get_config()
    c.batch_size = 12
    c.mesh.data, c.mesh.fsdp = 1, 8
    with pytest.raises(ConfigError, match=r"config\.batch_size=12 .*data\*fsdp=8"):
        config_lib.validate(c, num_devices=8)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clipjax.toy", "--config=configs/toy/mlp.py", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


def test_cli_unknown_key_is_one_line():
    r = _cli("--config.nonexistent=1")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--config.nonexistent" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_cli_typo_suggests_key():
    r = _cli("--config.optim.lrr=1")
    assert r.returncode == 2 and 'Did you mean "lr"' in r.stderr, r.stderr[-2000:]


def test_cli_mesh_mismatch_is_one_line(tmp_path):
    r = _cli(f"--workdir={tmp_path}", "--config.mesh.data=4")
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "config.mesh" in err[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_trains_with_override(tmp_path):
    r = _cli(f"--workdir={tmp_path}", "--config.total_steps=12", "--config.train.log_every=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done at step 12" in r.stdout
    assert (tmp_path / "checkpoints" / "12").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_missing_config_file_is_one_line():
    r = subprocess.run([sys.executable, "-m", "clipjax.toy", "--config=configs/does_not_exist.py"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "error: --config=configs/does_not_exist.py: cannot load the config file" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
