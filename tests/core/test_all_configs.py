"""Every config file loads, has get_config(), and passes start-up validation."""
import glob
import importlib.util
import os

import pytest

from clipjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 if not os.path.basename(p).startswith(("_", "common")))


def _load(path):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_validates(path):
    c = _load(path)
    if "task" not in c or not c.task:
        # Shape-only configs (e.g. the 12B DALL-E) describe a model and nothing to train.
        assert "model" in c
        return
    # A pod-sized mesh: 64 devices, so -1 fills and batch divisibility are checked for real.
    config_lib.validate(c, num_devices=64 if c.batch_size % 64 == 0 else 1)
    assert c.total_steps > 0 and c.batch_size > 0
