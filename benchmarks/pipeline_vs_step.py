"""Can the input pipeline feed the train step? digits pipeline images/s vs tiny-CLIP step samples/s.

    JAX_PLATFORMS=cpu python benchmarks/pipeline_vs_step.py [--reps 5] [--batches 8] [--steps 8]

Same config for both, ``configs/clip/digits_tiny.py`` (tiny-vit, 32 px, batch 128):

- pipeline:   ``clipjax.data.pipeline.make_train_iterator`` on the digits built-in (read,
  random-resized-crop, tokenize, batch, prefetch), ``--batches`` batches pulled as fast as
  possible, timed after draining the batches it prefetched while the other rows ran.
- step:       ``clipjax.trainer.Trainer.step`` on one placed batch, ``--steps`` steps
  (donated state, the jitted step users train with), blocking on the loss.
- loop:       both together, as ``clipjax.trainer.train`` runs them: next batch from the
  iterator, ``place_batch``, ``step`` (the rate a user sees).

Repetitions alternate the three; the table gives median rates and pipeline / step (goal >= 2x:
the pipeline should never be what a CPU run waits for).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

from benchmarks.common import alternate, machine_line, print_table, rates  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(_ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/clip/digits_tiny.py")
    ap.add_argument("--batch_size", type=int, default=0, help="0 = the config's")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=12, help="batches per timed pipeline repetition")
    ap.add_argument("--steps", type=int, default=8, help="train steps per timed step/loop repetition")
    args = ap.parse_args()

    import jax
    from clipjax.data import pipeline
    from clipjax.train import clip_task
    from clipjax.trainer import Trainer

    config = load_config(args.config)
    if args.batch_size:
        config.batch_size = args.batch_size
    config.total_steps = 1_000_000
    b = int(config.batch_size)

    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(config, 0)
    for _ in range(2):
        next(it)
    t_pipe = time.perf_counter() - t0
    task = clip_task(config)
    trainer = Trainer(task, config)
    holder = {"state": trainer.init_state()}
    fixed = trainer.place_batch({k: v for k, v in next(it).items() if k in ("images", "tokens")})
    t_build = time.perf_counter() - t0

    # The iterator prefetches while the other rows run, so a timed pull starts by draining what
    # is ready (untimed): prefetch batches + the batching stage's one, + 1 for margin.
    drain = int(config.data.prefetch) + 2
    pull_times = []

    def pull():
        for _ in range(drain):
            next(it)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        pull_times.append(time.perf_counter() - t)

    def steps():
        for _ in range(args.steps):
            holder["state"], metrics = trainer.step(holder["state"], fixed)
        jax.block_until_ready(metrics["loss"])

    def loop():
        for _ in range(args.steps):
            batch = next(it)
            batch = trainer.place_batch({k: batch[k] for k in ("images", "tokens")})
            holder["state"], metrics = trainer.step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    steps()  # compile
    n_compiled = trainer.step_fn._cache_size()
    print(f"pipeline first batches {t_pipe:.1f}s; state + compile {time.perf_counter() - t0 - t_pipe:.1f}s "
          f"(setup {t_build:.1f}s)", file=sys.stderr)
    times = alternate({"pipeline": pull, "step": steps, "loop": loop}, reps=args.reps, warmup=1,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    if trainer.step_fn._cache_size() != n_compiled:
        print("WARNING: the step recompiled during timing", file=sys.stderr)
    # seconds per call -> seconds per batch, so every row counts images per second
    pull_times = pull_times[-args.reps:]  # the timed reps (not the warm-up)
    per_batch = {"pipeline": [t / args.batches for t in pull_times],
                 "step": [t / args.steps for t in times["step"]],
                 "loop": [t / args.steps for t in times["loop"]]}
    r = rates(per_batch, b)
    print(f"\n{args.config}: {config.model.name}, {config.data.image_size} px, batch {b}, "
          f"median of {args.reps} alternating reps ({args.batches} batches / {args.steps} steps each)")
    print(f"{machine_line()} (at the end of the run); jax {jax.__version__}")
    print()
    print_table(per_batch, b, reference="step", unit="images/s")
    print(f"\npipeline / step = {r['pipeline'] / r['step']:.2f}x (goal >= 2x); "
          f"loop / step = {r['loop'] / r['step']:.2f}x")


if __name__ == "__main__":
    main()
