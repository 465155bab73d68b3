"""Accelerator MFU: CLIP ViT-B/16 bf16 train step, DALL-E transformer train step, sampling tokens/s.

    python benchmarks/device_mfu.py                 # on one GPU / TPU host (prints a markdown table)
    JAX_PLATFORMS=cpu python benchmarks/device_mfu.py --quick   # CPU smoke run: tiny models, seconds

Rows:

- ``clip``: ``configs/clip/vit_b16.py`` (bf16 compute, f32 params, scan + remat as in the paper
  config) with ``--clip_batch``, stepped by ``clipjax.trainer.Trainer.step`` (what users get).
  FLOPs/sample = ``task.flops_per_example`` (3x XLA's cost analysis of the forward pass).
- ``dalle``: ``dallejax.transformer.DalleTransformer`` (``--dalle_width`` x ``--dalle_layers``,
  256 text + 32x32 image tokens, the paper's row/column/conv schedule, bf16 compute), loss
  ``dallejax.transformer.dalle_loss``, optax AdamW, one jitted donated step.
  FLOPs/sample = 3x XLA's cost analysis of one example's forward pass.
- ``sampling``: ``dallejax.sampling.sample`` (KV cache) for that model, image tokens/s.

MFU = achieved FLOP/s / peak, with the peak from ``clipjax.metrics.PEAK_FLOPS`` (datasheet dense
bf16) and, beside it, the best bf16 matmul this run measured (``--matmul`` square). Each row is
compiled first, then timed ``--reps`` times (median).
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from benchmarks.common import machine_line, timed  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(_ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _median_time(fn, reps, iters):
    return statistics.median(timed(fn, iters) for _ in range(reps))


def measured_peak(n: int, dtype) -> float:
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready(), 3) for _ in range(3))
    return 2 * n ** 3 / best


def bench_clip(args):
    import jax
    import numpy as np
    from clipjax.train import clip_task
    from clipjax.trainer import Trainer

    if args.quick:
        config = load_config("configs/clip/digits_tiny.py")
        config.model.dtype = "bfloat16"
        config.model.scan = True
        config.batch_size = 8
    else:
        config = load_config("configs/clip/vit_b16.py")
        config.batch_size = args.clip_batch
    config.total_steps = 100_000
    config.optim.warmup_steps = 10
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    b = int(config.batch_size)
    task = clip_task(config)
    trainer = Trainer(task, config)
    holder = {"state": trainer.init_state()}
    rng = np.random.default_rng(0)
    size, ctx = config.data.image_size, config.data.context_length
    batch = trainer.place_batch({"images": rng.standard_normal((b, size, size, 3), dtype=np.float32),
                                 "tokens": rng.integers(1, 49407, (b, ctx)).astype(np.int32)})

    def step():
        holder["state"], m = trainer.step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    t = _median_time(step, args.reps, args.iters)
    return dict(name=f"clip {config.model.name} {config.model.dtype} scan={config.model.scan} "
                     f"remat={config.model.remat_policy}",
                batch=b, rate=b / t, unit="samples/s", flops=b * task.flops_per_example / t, compile_s=compile_s)


def dalle_model(args):
    import jax.numpy as jnp
    from dallejax.transformer import DalleConfig, DalleTransformer
    if args.quick:
        cfg = DalleConfig(text_vocab_size=1024, text_len=16, image_vocab_size=512, grid=8, width=64,
                          num_layers=4, num_heads=4, attention="dalle", conv_kernel=3)
        return DalleTransformer(cfg, dtype=jnp.bfloat16)
    cfg = DalleConfig(text_vocab_size=16384, text_len=256, image_vocab_size=8192, grid=32,
                      width=args.dalle_width, num_layers=args.dalle_layers,
                      num_heads=args.dalle_width // 64, attention="dalle", conv_kernel=11)
    return DalleTransformer(cfg, dtype=jnp.bfloat16, scan=True, remat_policy="dots_with_no_batch_dims_saveable")


def _forward_flops(model, params_shapes) -> float:
    import jax
    import jax.numpy as jnp
    cfg = model.config
    text = jax.ShapeDtypeStruct((1, cfg.text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((1, cfg.image_len), jnp.int32)
    cost = jax.jit(lambda p, t, i: model.apply({"params": p}, t, i)).lower(params_shapes, text, image).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def bench_dalle(args, model):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from dallejax.transformer import dalle_loss

    cfg = model.config
    b = 4 if args.quick else args.dalle_batch
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(0, cfg.text_vocab_size, (b, cfg.text_len)), jnp.int32)
    image = jnp.asarray(rng.integers(0, cfg.image_vocab_size, (b, cfg.image_len)), jnp.int32)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, text[:1], image[:1])["params"]))(jax.random.key(0))
    tx = optax.adamw(1e-4, b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.045)
    opt_state = jax.jit(tx.init)(params)
    flops_per_example = 3.0 * _forward_flops(model, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                                 params))

    def _step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(dalle_loss, has_aux=True)(params, batch, model)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step_fn = jax.jit(_step, donate_argnums=(0, 1))
    holder = {"p": params, "o": opt_state}
    batch = {"text": text, "image": image}

    def step():
        holder["p"], holder["o"], loss = step_fn(holder["p"], holder["o"], batch)
        jax.block_until_ready(loss)

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    t = _median_time(step, args.reps, args.iters)
    n_params = sum(x.size for x in jax.tree.leaves(holder["p"]))
    row = dict(name=f"dalle w{cfg.width} x{cfg.num_layers} seq {cfg.seq_len} bf16 ({n_params / 1e6:.1f}M params)",
               batch=b, rate=b / t, unit="samples/s", flops=b * flops_per_example / t, compile_s=compile_s)
    return row, holder["p"]


def bench_sampling(args, model, params):
    import numpy as np
    from dallejax import sampling
    cfg = model.config
    b = 2 if args.quick else args.sample_batch
    text = sampling.empty_caption(cfg, b)
    text[:, 1:4] = [5, 6, cfg.end_of_text]

    def run():
        np.asarray(sampling.sample(model, params, text, 0, temperature=1.0, top_k=64))

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    t = _median_time(run, max(1, args.reps // 2), 1)
    return dict(name=f"sampling (KV cache) {cfg.image_len} image tokens", batch=b,
                rate=b * cfg.image_len / t, unit="tokens/s", flops=0.0, compile_s=compile_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, for a CPU smoke run")
    ap.add_argument("--rows", default="clip,dalle,sampling")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--clip_batch", type=int, default=512)
    ap.add_argument("--dalle_width", type=int, default=1024)
    ap.add_argument("--dalle_layers", type=int, default=24)
    ap.add_argument("--dalle_batch", type=int, default=32)
    ap.add_argument("--sample_batch", type=int, default=16)
    ap.add_argument("--matmul", type=int, default=8192)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.iters, args.matmul = min(args.reps, 3), 1, 512

    import jax
    import jax.numpy as jnp
    from clipjax import metrics

    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows_wanted) - {"clip", "dalle", "sampling"}
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; choose from clip, dalle, sampling")
    dev = jax.devices()[0]
    table_peak = metrics.peak_flops_per_device()
    meas_peak = measured_peak(args.matmul, jnp.bfloat16)
    rows = []
    if "clip" in rows_wanted:
        rows.append(bench_clip(args))
    model = params = None
    if "dalle" in rows_wanted or "sampling" in rows_wanted:
        model = dalle_model(args)
    if "dalle" in rows_wanted:
        row, params = bench_dalle(args, model)
        rows.append(row)
    if "sampling" in rows_wanted:
        if params is None:
            import flax.linen as nn
            cfg = model.config
            params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, cfg.text_len), jnp.int32),
                                                       jnp.zeros((1, cfg.image_len), jnp.int32))["params"])
        rows.append(bench_sampling(args, model, params))

    print(f"\n{dev.device_kind} ({dev.platform}, {jax.device_count()} device(s) used: 1); jax {jax.__version__}; "
          f"{machine_line()}; median of {args.reps} reps x {args.iters} step(s)" + (" [--quick smoke]" if args.quick
                                                                                    else ""))
    print(f"peak: datasheet {table_peak / 1e12:.0f} TFLOP/s" if table_peak else "peak: no datasheet entry",
          f"| measured bf16 matmul {args.matmul}^2: {meas_peak / 1e12:.3f} TFLOP/s")
    print()
    print("| row | batch | rate | TFLOP/s | MFU (datasheet) | MFU (measured matmul) | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu_t = f"{r['flops'] / table_peak:.1%}" if (r["flops"] and table_peak) else "-"
        mfu_m = f"{r['flops'] / meas_peak:.1%}" if r["flops"] else "-"
        tf = f"{r['flops'] / 1e12:.3f}" if r["flops"] else "-"
        print(f"| {r['name']} | {r['batch']} | {r['rate']:.1f} {r['unit']} | {tf} | {mfu_t} | {mfu_m} | "
              f"{r['compile_s']:.0f} |")


if __name__ == "__main__":
    main()
