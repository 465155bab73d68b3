"""CLIP training end to end on the built-in digits: the real tokenizer, the tf.data pipeline,
the shared trainer and the evaluators. A short run must learn (zero-shot >= 80% held out)."""
import subprocess
import sys

import pytest

from clipjax import trainer
from clipjax.config import ConfigError
from clipjax.train import clip_task
from configs.clip import digits_tiny


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    c = digits_tiny.get_config()
    c.total_steps = 250
    c.optim.warmup_steps = 25
    c.checkpoint.every_steps = 0
    c.train.progress_bar = False
    c.eval.linear_probe_train_examples = 500
    return trainer.train(clip_task(c), c, str(tmp_path_factory.mktemp("clip")))


def test_short_run_learns_zero_shot(short_run):
    ev = short_run.eval_metrics
    assert ev["zero_shot/top1"] >= 0.80, ev
    assert ev["zero_shot/top5"] >= ev["zero_shot/top1"]
    assert ev["linear_probe/accuracy"] >= 0.80, ev
    assert 0.0 <= ev["retrieval/i2t_R@1"] <= ev["retrieval/i2t_R@5"] <= ev["retrieval/i2t_R@10"] <= 1.0


def test_loss_below_chance_and_temperature_clamped(short_run):
    m = short_run.last_metrics
    # Chance is log(128) = 4.85; with ~13 images per digit in a batch the floor is ~log(13) = 2.6.
    assert m["loss"] < 3.5, m
    assert 0 < m["logit_scale"] <= 100.0


def test_sigmoid_loss_trains(tmp_path):
    c = digits_tiny.get_config()
    c.model.loss = "sigmoid"
    c.total_steps, c.batch_size, c.optim.warmup_steps = 20, 32, 5
    c.model.count_flops = False
    c.checkpoint.every_steps = 0
    c.train.progress_bar = False
    c.eval.zero_shot = c.eval.retrieval = c.eval.linear_probe = False
    res = trainer.train(clip_task(c), c, str(tmp_path))
    assert res.last_metrics["logit_bias"] < 0 and res.last_metrics["loss"] > 0


def test_unknown_model_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clipjax.train", "--config=configs/clip/digits_tiny.py",
                        f"--workdir={tmp_path}", "--config.model.name=ViT-Q-99"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "Unknown model 'ViT-Q-99'" in err[0] and "ViT-B-32" in err[0]


def test_image_size_mismatch_names_key():
    c = digits_tiny.get_config()
    c.data.image_size = 64
    with pytest.raises(ConfigError, match=r"config\.data\.image_size=64 .* takes 32 px"):
        clip_task(c)
