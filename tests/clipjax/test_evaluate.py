"""clipjax.evaluate: restores a run's latest checkpoint and reproduces the evaluators the trainer
ran at the end of that run; the CLI prints a table and writes JSON; a missing source is one line."""
import json
import subprocess
import sys

import pytest

from clipjax import evaluate, trainer
from clipjax.config import ConfigError
from clipjax.train import clip_task
from configs.clip import digits_tiny


def _config():
    c = digits_tiny.get_config()
    c.total_steps, c.optim.warmup_steps = 20, 2
    c.model.count_flops = False
    c.train.progress_bar = False
    c.checkpoint.every_steps = 0
    c.eval.max_examples = 120
    c.eval.linear_probe_train_examples = 200
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    c = _config()
    workdir = str(tmp_path_factory.mktemp("clip"))
    return workdir, trainer.train(clip_task(c), c, workdir)


def test_restored_metrics_equal_end_of_run_evals(run):
    workdir, result = run
    report = evaluate.evaluate(_config(), workdir)
    assert report["step"] == 20
    assert set(report["metrics"]) == set(result.eval_metrics)
    for k, v in result.eval_metrics.items():
        assert report["metrics"][k] == pytest.approx(v, abs=1e-6), k
    table = evaluate.format_table(report)
    assert "zero_shot/top1" in table and "retrieval/t2i_R@1" in table


def test_eval_switches_choose_evaluators(run):
    c = _config()
    c.eval.zero_shot = c.eval.linear_probe = False
    report = evaluate.evaluate(c, run[0])
    assert set(report["metrics"]) == {f"retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    c.eval.retrieval = False
    with pytest.raises(ConfigError, match="every evaluator off"):
        evaluate.evaluate(c, run[0])


def test_nothing_to_evaluate_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        evaluate.evaluate(_config(), str(tmp_path))


def test_cli_prints_table_and_writes_json(run):
    workdir, result = run
    r = subprocess.run([sys.executable, "-m", "clipjax.evaluate", "--config=configs/clip/digits_tiny.py",
                        f"--workdir={workdir}", "--config.eval.max_examples=120",
                        "--config.eval.linear_probe=False", "--config.eval.retrieval=False"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "zero_shot/top1" in r.stdout
    with open(f"{workdir}/eval_step20.json") as f:
        saved = json.load(f)
    assert saved["metrics"]["zero_shot/top1"] == pytest.approx(result.eval_metrics["zero_shot/top1"], abs=1e-6)


def test_tfds_classification_dataset(run):
    """config.data.source='tfds' (cifar10, offline via tfds.testing.mock_data): zero-shot with the
    cifar class names and templates, retrieval over prompt captions; every image is counted."""
    tfds = pytest.importorskip("tensorflow_datasets")
    c = _config()
    c.data.source, c.data.name, c.data.label_key, c.data.eval_split = "tfds", "cifar10", "label", "test"
    c.eval.linear_probe = False
    with tfds.testing.mock_data(num_examples=24):
        report = evaluate.evaluate(c, run[0])
    m = report["metrics"]
    assert report["data"] == "tfds:cifar10/test"
    assert 0.0 <= m["zero_shot/top1"] <= m["zero_shot/top5"] <= 1.0
    assert m["retrieval/i2t_R@1"] <= m["retrieval/i2t_R@10"] <= 1.0
    # 24 images: every accuracy is a multiple of 1/24
    assert abs(m["zero_shot/top1"] * 24 - round(m["zero_shot/top1"] * 24)) < 1e-6


def test_imagenet_zero_shot_uses_clip_class_names_and_80_templates():
    """tfds imagenet2012 labels are WordNet ids; zero-shot must use OpenAI CLIP's 1,000 edited
    names (same order as the synsets, checked against open_clip's copy) and the 80 templates."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from clipjax.data import pipeline
    from clipjax.evals import classnames as cn
    from open_clip import zero_shot_metadata as oc
    assert cn.IMAGENET_CLASSNAMES == tuple(oc.IMAGENET_CLASSNAMES)
    assert len(cn.IMAGENET_CLASSNAMES) == 1000 and cn.IMAGENET_CLASSNAMES[0] == "tench"
    for name in ("imagenet2012", "imagenet2012:5.1.0", "imagenet_v2/matched-frequency"):
        assert cn.templates_for(name) == cn.IMAGENET_TEMPLATES and len(cn.IMAGENET_TEMPLATES) == 80
    assert cn.templates_for("cifar10") == cn.CIFAR_TEMPLATES
    c = _config()
    c.data.source, c.data.name, c.data.label_key, c.data.eval_split = "tfds", "imagenet2012", "label", "validation"
    with tfds.testing.mock_data(num_examples=4):
        src = pipeline.make_source(c.data, "eval")
        assert list(src.classnames) == list(cn.IMAGENET_CLASSNAMES)
        ex = src.get(0)
    assert ex.label is not None and ex.captions[0] in [t.format(cn.IMAGENET_CLASSNAMES[ex.label])
                                                        for t in cn.IMAGENET_TEMPLATES]
