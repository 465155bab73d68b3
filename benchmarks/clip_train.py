"""CLIP train step: clipjax (the real Trainer.step) vs open_clip (torch), same run, alternating.

    JAX_PLATFORMS=cpu python benchmarks/clip_train.py --model=ViT-B-32 --batch=32 --reps=5
    python benchmarks/clip_train.py --xla_flags="--xla_cpu_use_thunk_runtime=false"   # try XLA CPU flags
    python benchmarks/clip_train.py --variants=default,scan,remat_full                  # several jax steps

Both sides train the same model (random init) on the same random batch with AdamW in float32:

- open_clip: ``model.train()``, ``open_clip.ClipLoss``, ``torch.optim.AdamW``; zero_grad,
  backward, step.
- clipjax: ``clipjax.train.clip_task`` from ``configs/clip/vit_b32.py`` with ``batch_size``,
  ``dtype='float32'``, ``scan``/``remat_policy`` overridden per variant, stepped by
  ``clipjax.trainer.Trainer.step`` (donated state, the same jitted function users train with).

Repetitions alternate the implementations (torch, jax variants, torch, ...); the table shows
median samples/s, the ratio to open_clip, and MFU = samples/s x FLOPs/sample / peak, where
FLOPs/sample is ``task.flops_per_example`` (3x XLA's cost analysis of the forward pass) and the
peak is measured in the same run: the best of an f32 matmul in jax and in torch.
Both libraries use all usable cores unless ``--threads`` is given (then both use that many).
"""
from __future__ import annotations

import os
import sys

# XLA flags must be in the environment before jax is imported.
for _arg in list(sys.argv):
    if _arg.startswith("--xla_flags="):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _arg.split("=", 1)[1]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import importlib.util  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from benchmarks.common import alternate, machine_line, print_table, rates  # noqa: E402

flags.DEFINE_string("model", "ViT-B-32", "registry / open_clip model name")
flags.DEFINE_string("config", "configs/clip/vit_b32.py", "clipjax config file (its model.name is replaced)")
flags.DEFINE_integer("batch", 32, "global batch")
flags.DEFINE_integer("reps", 5, "timed repetitions per implementation (alternating)")
flags.DEFINE_integer("iters", 1, "train steps per timed repetition")
flags.DEFINE_integer("threads", 0, "threads for torch and XLA (0 = all usable cores)")
flags.DEFINE_list("variants", ["default"],
                  "clipjax variants: default (scan off, remat none), scan, remat_full, remat_dots, "
                  "precision_highest")
flags.DEFINE_string("xla_flags", "", "extra XLA_FLAGS for the jax side (read before jax is imported)")
flags.DEFINE_bool("torch", True, "also time open_clip (the reference)")
flags.DEFINE_integer("matmul", 2048, "side of the square f32 matmul that measures the peak")
FLAGS = flags.FLAGS


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(_ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def clipjax_config(variant: str):
    c = load_config(FLAGS.config)
    c.model.name = FLAGS.model
    c.model.dtype = "float32"
    c.model.scan = variant == "scan"
    c.model.remat_policy = {"remat_full": "full", "remat_dots": "dots_with_no_batch_dims_saveable"}.get(
        variant, "none")
    c.batch_size = FLAGS.batch
    c.total_steps = 10_000
    c.optim.warmup_steps = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c


def matmul_peak_jax(n: int) -> float:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_time(lambda: f(a).block_until_ready()) for _ in range(5))
    return 2 * n ** 3 / best


def matmul_peak_torch(n: int) -> float:
    import torch
    a = torch.randn(n, n)
    a @ a
    best = min(_time(lambda: a @ a) for _ in range(5))
    return 2 * n ** 3 / best


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv):
    del argv
    cores = sorted(os.sched_getaffinity(0))
    threads = FLAGS.threads or len(cores)
    os.sched_setaffinity(0, cores[:threads])  # XLA's pool sizes itself from the affinity mask
    import jax
    import numpy as np
    from clipjax.train import clip_task
    from clipjax.trainer import Trainer

    b = FLAGS.batch
    fns, flops, info = {}, None, {}
    rng = np.random.default_rng(0)

    if FLAGS.torch:
        import open_clip
        import torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        ref = open_clip.create_model(FLAGS.model).train()
        size, ctx = ref.visual.image_size, ref.context_length
        size = size[0] if isinstance(size, (tuple, list)) else size
        opt = torch.optim.AdamW(ref.parameters(), lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
        clip_loss = open_clip.ClipLoss()
        images_t = torch.randn(b, 3, size, size)
        tokens_t = torch.randint(1, 49407, (b, ctx))

        def torch_step():
            opt.zero_grad(set_to_none=True)
            out = ref(images_t, tokens_t)
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = clip_loss(out[0], out[1], out[2])
            loss.backward()
            opt.step()
            return loss

        fns["open_clip"] = torch_step

    trainers = {}
    for variant in FLAGS.variants:
        config = clipjax_config(variant)
        t0 = time.perf_counter()
        task = clip_task(config)
        trainer = Trainer(task, config)
        state = trainer.init_state()
        size, ctx = config.data.image_size, config.data.context_length
        batch = trainer.place_batch({
            "images": rng.standard_normal((b, size, size, 3), dtype=np.float32),
            "tokens": rng.integers(1, 49407, (b, ctx)).astype(np.int32)})
        holder = {"state": state}
        precision = "highest" if variant == "precision_highest" else None

        def jax_step(trainer=trainer, holder=holder, batch=batch, precision=precision):
            with jax.default_matmul_precision(precision):
                holder["state"], metrics = trainer.step(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])
            return metrics

        jax_step()  # compile
        n_compiled = trainer.step_fn._cache_size()
        _log(f"{variant}: built + compiled in {time.perf_counter() - t0:.0f}s")
        flops = task.flops_per_example
        fns[f"clipjax {variant}"] = jax_step
        trainers[variant] = (trainer, n_compiled)

    _log("measuring matmul peak ...")
    peaks = {"jax": matmul_peak_jax(FLAGS.matmul)}
    if FLAGS.torch:
        peaks["torch"] = matmul_peak_torch(FLAGS.matmul)
    peak = max(peaks.values())
    times = alternate(fns, reps=FLAGS.reps, iters=FLAGS.iters, warmup=1, log=_log)
    peaks_after = {"jax": matmul_peak_jax(FLAGS.matmul)}
    if FLAGS.torch:
        peaks_after["torch"] = matmul_peak_torch(FLAGS.matmul)
    peak = max(peak, *peaks_after.values())
    for variant, (trainer, n0) in trainers.items():
        if trainer.step_fn._cache_size() != n0:
            _log(f"WARNING: {variant} recompiled during timing ({n0} -> {trainer.step_fn._cache_size()})")

    r = rates(times, b)
    mfu = {name: f"{rate * flops / peak:.1%}" for name, rate in r.items()} if flops else {}
    print(f"\n{FLAGS.model} train step, batch {b}, AdamW, f32, {threads} thread(s) each; "
          f"median of {FLAGS.reps} alternating reps x {FLAGS.iters} step(s)")
    print(f"{machine_line()} (at the end of the run)")
    versions = f"jax {jax.__version__}"
    if FLAGS.torch:
        import open_clip
        import torch
        versions += f", torch {torch.__version__}, open_clip {open_clip.__version__}"
    print(f"{versions}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"FLOPs/sample (XLA cost analysis, 3x forward) {flops / 1e9:.1f} GFLOP; f32 matmul {FLAGS.matmul}^3 peak: "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()) + " GFLOP/s before, "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks_after.items()) + f" after; using {peak / 1e9:.1f}")
    print()
    reference = "open_clip" if "open_clip" in times else next(iter(times))
    print_table(times, b, reference, unit="samples/s", extra={"MFU": mfu} if mfu else None)


if __name__ == "__main__":
    app.run(main)
