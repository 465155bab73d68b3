"""Evaluate a trained or converted CLIP: the evaluators ``config.eval`` chooses, on ``config.data``'s
eval split; a table on stdout and JSON in the workdir.

    python -m clipjax.evaluate --config=configs/clip/digits_tiny.py --workdir=/tmp/clip_digits
    python -m clipjax.evaluate --config=configs/clip/vit_b32.py --config.model.init_from=ViT-B-32.pt \
        --config.data.source=tfds --config.data.name=cifar10 --config.data.label_key=label \
        --config.eval.retrieval=False --workdir=/tmp/eval_b32

The parameters are the latest checkpoint in ``--workdir`` (``trainer.restore_state``; EMA
parameters when the run kept them), or, when the workdir has none, ``config.model.init_from``.
Which evaluators run: ``config.eval.zero_shot`` / ``retrieval`` / ``linear_probe`` (CLIP tasks);
a fine-tuning config (``clipjax.finetune``) reports its classifier ``accuracy``.
Datasets: the built-ins, or TFDS ones already on disk (``config.data.source='tfds'``, e.g.
cifar10, cifar100, imagenet2012 with ``label_key='label'``; coco_captions with
``caption_key='captions/text'``), or shards/manifests.
"""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np

from clipjax.config import ConfigError


def _has_checkpoint(workdir: str) -> bool:
    if not workdir or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    from clipjax import checkpoint as ckpt_lib
    return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).latest_step() is not None


def load_variables(task, config, workdir: str) -> tuple:
    """(params, model_state, step, where) to evaluate: the workdir's latest checkpoint, else init_from."""
    from clipjax import trainer
    if _has_checkpoint(workdir):
        state = trainer.restore_state(config, workdir, task=task)
        return state.eval_params(), state.model_state, int(jax.device_get(state.step)), f"{workdir} (checkpoint)"
    init_from = config.model.get("init_from", "") if "model" in config else ""
    is_finetune = "init" in config and config.init.get("workdir", "")
    if not init_from and not is_finetune:
        where = f"--workdir={workdir} has no checkpoints" if workdir else "no --workdir given"
        raise ConfigError(f"nothing to evaluate: {where}; pass the workdir of a training run or "
                          f"--config.model.init_from=<weights file>")
    variables = dict(nn.unbox(jax.jit(task.init)(jax.random.key(int(config.seed)))))
    params = variables.pop("params")
    return params, variables, 0, init_from or f"{config.init.workdir} (fine-tuning start)"


def evaluate(config, workdir: str = "") -> dict:
    """Runs the task's evaluators; returns ``{'<evaluator>/<metric>': value}`` plus timings."""
    from clipjax import trainer
    if "model" in config and "count_flops" in config.model:
        config.model.count_flops = False    # no MFU here; skip the cost analysis
    task = trainer.load_task(config)
    if not task.evaluators:
        raise ConfigError("config.eval turns every evaluator off; set config.eval.zero_shot, retrieval "
                          "or linear_probe to True")
    params, model_state, step, where = load_variables(task, config, workdir)
    results, timing = {}, {}
    for name, fn in task.evaluators.items():
        t0 = time.perf_counter()
        out = fn(params, model_state, step)
        timing[name] = time.perf_counter() - t0
        results.update({f"{name}/{k}": float(v) for k, v in out.items()})
    return {"step": step, "weights": where, "task": task.name, "data": _data_name(config),
            "metrics": results, "seconds": timing}


def _data_name(config) -> str:
    d = config.data
    return f"{d.source}:{d.name}/{d.eval_split}" if d.source == "tfds" else f"{d.source}/{d.eval_split}"


def format_table(report: dict) -> str:
    rows = [("metric", "value")] + [(k, f"{v:.4f}") for k, v in report["metrics"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{report['task']} @ step {report['step']} ({report['weights']}) on {report['data']}"]
    lines += [f"{a:<{width}}  {b:>8}" for a, b in rows]
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items()))
    return "\n".join(lines)


def evaluate_main(config, workdir: str) -> int:
    from clipjax import parallel
    parallel.maybe_initialize_distributed(config.distributed)
    report = evaluate(config, workdir)
    if jax.process_index() == 0:
        print(format_table(report), flush=True)
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, f"eval_step{report['step']}.json")
            with open(path, "w") as f:
                json.dump(report, f, indent=1, sort_keys=True)
            print(f"wrote {path}", flush=True)
    return 0


def run():
    from clipjax import cli
    cli.run_main(evaluate_main)


if __name__ == "__main__":
    run()
