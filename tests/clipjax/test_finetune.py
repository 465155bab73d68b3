"""Fine-tuning for classification, on the shared trainer, starting from a short CLIP digits run.

Thresholds. The head starts as the zero-shot classifier (times the logit scale), so the
accuracy evaluator at step 0 must reproduce the CLIP run's own zero-shot top-1 (same eval
images, same prompts; allowed to differ by one image for float ties). Fine-tuning then trains
on labelled digits with cross-entropy: the held-out accuracy must not drop below the start
(a short CLIP run's image features already separate digits: its linear probe is >= 80% in
tests/clipjax/test_train.py), and from a start >= 80% it must reach >= 90%: a supervised
linear probe on those features alone gets there, and the fine-tune moves the tower as well.
Measured with this fixture (200 CLIP steps, 80 fine-tuning steps): 0.944 -> 0.967.
"""
import subprocess
import sys

import pytest

from clipjax import finetune, trainer
from clipjax.config import ConfigError
from configs.clip import digits_tiny, finetune_digits


def _quiet(c):
    c.train.progress_bar = False
    c.checkpoint.every_steps = 0
    return c


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    c = _quiet(digits_tiny.get_config())
    c.total_steps, c.optim.warmup_steps = 200, 20
    c.model.count_flops = False
    c.eval.retrieval = c.eval.linear_probe = False
    workdir = str(tmp_path_factory.mktemp("clip"))
    return workdir, trainer.train(__import__("clipjax.train").train.clip_task(c), c, workdir)


def _ft_config(clip_workdir, **kw):
    c = _quiet(finetune_digits.get_config())
    c.init.workdir = clip_workdir
    c.total_steps, c.optim.warmup_steps, c.optim.lr = 80, 8, 1e-3  # short run: a larger step than the config's
    c.model.count_flops = False
    for k, v in kw.items():
        c.finetune[k] = v
    return c


@pytest.fixture(scope="module")
def finetuned(clip_run, tmp_path_factory):
    c = _ft_config(clip_run[0])
    task = finetune.finetune_task(c)
    import flax.linen as nn
    import jax
    variables = dict(nn.unbox(task.init(jax.random.key(0))))
    params = variables.pop("params")
    start = task.evaluators["accuracy"](params, variables, 0)
    result = trainer.train(task, c, str(tmp_path_factory.mktemp("ft")))
    return start, result, params


def test_head_starts_at_zero_shot(clip_run, finetuned):
    start, _, params = finetuned
    zs = clip_run[1].eval_metrics["zero_shot/top1"]
    assert abs(start["top1"] - zs) <= 1.5 / 359, (start, zs)  # at most one of the 359 test digits differs
    assert set(params) == {"visual", "logit_scale", "head"}  # the text tower is not trained state
    assert params["head"]["kernel"].shape == (32, 10)


def test_finetune_improves_on_zero_shot(finetuned):
    start, result, _ = finetuned
    acc = result.eval_metrics["accuracy/top1"]
    print(f"fine-tune: zero-shot start top1={start['top1']:.4f} -> {acc:.4f}")
    assert acc >= start["top1"], (start, acc)
    if start["top1"] >= 0.80:
        assert acc >= 0.90, (start, acc)
    # Room to improve: it must actually learn. Measured: 0.944 -> 0.967 (this fixture), and from a
    # 150-step start 0.836 -> 0.891; +0.01 is ~4 of the 359 held-out digits.
    if start["top1"] < 0.95:
        assert acc >= start["top1"] + 0.01, (start, acc)
    assert result.eval_metrics["accuracy/top5"] >= acc
    assert result.last_metrics["loss"] < 1.0, result.last_metrics  # chance: log(10) = 2.3


def test_frozen_tower_only_moves_head(clip_run):
    import flax.linen as nn
    import jax
    import numpy as np
    c = _ft_config(clip_run[0], freeze_image=True, max_eval_examples=64)
    c.total_steps, c.optim.warmup_steps = 3, 1
    task = finetune.finetune_task(c)
    init = jax.device_get(nn.unbox(task.init(jax.random.key(0)))["params"])
    after = jax.device_get(trainer.train(task, c, "").state.params)
    for a, b in zip(jax.tree.leaves(after["visual"]), jax.tree.leaves(init["visual"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after["logit_scale"], init["logit_scale"])
    assert np.abs(after["head"]["kernel"] - init["head"]["kernel"]).max() > 0


def test_init_from_weights_file_matches_workdir(clip_run, finetuned, tmp_path):
    import jax
    from clipjax import convert
    workdir, result = clip_run
    c = _ft_config(workdir)
    model = finetune.load_clip(c)[0]
    path = str(tmp_path / "clip.msgpack")
    convert.save_clipjax(path, {"params": jax.device_get(result.state.params)}, model.config, "tiny-vit")
    c.init.workdir = ""
    c.model.name, c.model.init_from = "tiny-vit", path
    task = finetune.finetune_task(c)
    import flax.linen as nn
    variables = dict(nn.unbox(task.init(jax.random.key(0))))
    params = variables.pop("params")
    assert task.evaluators["accuracy"](params, variables, 0)["top1"] == pytest.approx(finetuned[0]["top1"], abs=1e-9)
    c.model.name = ""
    with pytest.raises(ConfigError, match=r"needs config\.model\.name"):
        finetune.finetune_task(c)


def test_no_init_source_is_config_error():
    c = finetune_digits.get_config()
    c.init.workdir = ""
    with pytest.raises(ConfigError, match=r"config\.init\.workdir .*config\.model\.init_from"):
        finetune.finetune_task(c)


def test_cli_missing_workdir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clipjax.finetune", "--config=configs/clip/finetune_digits.py",
                        f"--workdir={tmp_path / 'ft'}", f"--config.init.workdir={tmp_path / 'nothing'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "has no checkpoints/" in err[0], r.stderr[-2000:]
