"""Image tokens/s: KV-cached sampling vs full recompute (the reference), measured in the same run.

    JAX_PLATFORMS=cpu python benchmarks/dalle_sampling.py [--reps 3] [--batch 1] [--settings tiny,grid32]

Settings: ``tiny`` = configs/dalle/tiny.py (16 text + 4x4 image tokens); ``grid32`` = a small-width
model (width 64, 4 layers with the paper's row/column/conv schedule, 16 text tokens) over a
32 x 32 grid, i.e. 1,024 image tokens per sample. Both samplers are compiled first (not timed),
then timed in alternating repetitions; the table shows medians and recompute/cached.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from dallejax import sampling
from dallejax.transformer import DalleConfig, DalleTransformer, model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "dalle", "tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return model_from_config(mod.get_config().model)


def _grid32():
    cfg = DalleConfig(text_vocab_size=1024, text_len=16, image_vocab_size=512, grid=32, width=64, num_layers=4,
                      num_heads=4, attention="dalle", conv_kernel=11)
    return DalleTransformer(cfg)


SETTINGS = {"tiny": _tiny, "grid32": _grid32}


def _timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run(name: str, reps: int, batch: int) -> dict:
    model = SETTINGS[name]()
    cfg = model.config
    text = sampling.empty_caption(cfg, batch)
    text[:, 1:4] = [5, 6, cfg.end_of_text]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), text,
                                               np.zeros((batch, cfg.image_len), np.int32))["params"])
    kw = dict(temperature=1.0, top_k=64)
    fns = {"cached": lambda: sampling.sample(model, params, text, 0, **kw),
           "recompute": lambda: sampling.sample_uncached(model, params, text, 0, **kw)}
    first = {k: np.asarray(f()) for k, f in fns.items()}          # compile + warm up
    same = bool((first["cached"] == first["recompute"]).all())
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():                                    # alternate the two samplers
            times[k].append(_timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = batch * cfg.image_len
    return dict(name=name, tokens=tokens, seq=cfg.seq_len, cached=tokens / med["cached"],
                recompute=tokens / med["recompute"], ratio=med["recompute"] / med["cached"], same=same)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--settings", default="tiny,grid32")
    args = ap.parse_args()
    rows = [run(s.strip(), args.reps, args.batch) for s in args.settings.split(",") if s.strip()]
    print(f"device: {jax.devices()[0].platform} ({jax.device_count()} devices), batch {args.batch}, "
          f"{args.reps} alternating reps, median")
    print(f"| setting | image tokens | seq len | cached tok/s | recompute tok/s | cached / recompute | "
          f"same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tokens']} | {r['seq']} | {r['cached']:.1f} | {r['recompute']:.1f} | "
              f"{r['ratio']:.1f}x | {r['same']} |")


if __name__ == "__main__":
    main()
