"""Embedding throughput: clipjax vs open_clip, same weights, same process, alternating repetitions.

    JAX_PLATFORMS=cpu python benchmarks/clip_embed.py --model=ViT-B-32 --batch=32 --reps=7

Prints images/s and texts/s (median over ``--reps`` alternating timed runs, after warm-up) for
open_clip (torch, eval + inference_mode) and for clipjax variants, and the ratio to open_clip:

- ``clipjax``: jitted ``encode_image`` / ``encode_text``, f32, default matmul precision.
- ``clipjax donate``: the same with the input buffer donated. Measured: no gain, and XLA reports
  the donation unusable (no output has the input's shape, so there is nothing to alias).
- ``clipjax scan``: layers under ``nn.scan`` (smaller program; usually no faster on CPU).
- ``clipjax bf16``: bfloat16 compute (accelerators; on CPU mostly slower).
- ``clipjax trimmed`` (text only): tokens cut after the last EOT of the batch, rounded up to a
  multiple of 16 (exact: the text tower is causal and pools at the EOT; see
  ``clipjax.models.text.trim_padding``). open_clip always runs the 77-token context.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# --threads=1 must reach XLA before jax is imported: single-threaded runs on both sides are the
# fair comparison on a shared, oversubscribed CPU (spinning OpenMP threads suffer most there).
_SINGLE = "--threads=1" in sys.argv
if _SINGLE:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from clipjax import convert  # noqa: E402
from clipjax.models import CLIP, create_model  # noqa: E402
from clipjax.models.text import trim_padding  # noqa: E402

flags.DEFINE_string("model", "ViT-B-32", "Registry / open_clip model name.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("reps", 7, "Timed repetitions per implementation (alternating).")
flags.DEFINE_integer("iters", 3, "Batches per timed repetition.")
flags.DEFINE_list("variants", ["clipjax", "clipjax scan", "clipjax bf16", "clipjax trimmed"],
                  "clipjax variants to time.")
flags.DEFINE_integer("threads", 0, "1: single-threaded torch and XLA; 0: library defaults.")
flags.DEFINE_string("precision", "default", "jax.default_matmul_precision for the clipjax runs.")
FLAGS = flags.FLAGS

CAPTIONS = ["a photo of a cat sitting on a red sofa", "two dogs playing in the snow near a wooden fence",
            "an aerial view of a city at night with bright lights", "a bowl of ramen with an egg and scallions",
            "a man riding a bicycle down a busy street in the rain", "a diagram of the solar system"]


def _time(fn, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main(argv):
    del argv
    import open_clip
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    torch.manual_seed(0)
    ref = open_clip.create_model(FLAGS.model).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = create_model(FLAGS.model).config
    b, s = FLAGS.batch, cfg.vision.image_size
    rng = np.random.RandomState(0)
    images = rng.randn(b, s, s, 3).astype(np.float32)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    try:
        from clipjax.tokenizer import tokenize
        tokens = tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], context_length=cfg.text.context_length)
    except ImportError:
        tokens = np.zeros((b, cfg.text.context_length), np.int32)
        tokens[:, 0], tokens[:, 1:12], tokens[:, 12] = 49406, 320, 49407
    tokens_t = torch.from_numpy(np.asarray(tokens, np.int64))

    def torch_image():
        with torch.inference_mode():
            ref.encode_image(images_t)

    def torch_text():
        with torch.inference_mode():
            ref.encode_text(tokens_t)

    runs = {("image", "open_clip"): torch_image, ("text", "open_clip"): torch_text}
    for variant in FLAGS.variants:
        kw = {}
        if "scan" in variant:
            kw["scan"] = True
        if "bf16" in variant:
            kw["dtype"] = jnp.bfloat16
        model = create_model(FLAGS.model, **kw)
        variables = jax.device_put(convert.torch_to_clipjax(sd, model))
        donate = (1,) if "donate" in variant else ()
        enc_img = jax.jit(lambda v, x, m=model: m.apply(v, x, method=CLIP.encode_image), donate_argnums=donate)
        enc_txt = jax.jit(lambda v, t, m=model: m.apply(v, t, method=CLIP.encode_text), donate_argnums=donate)
        toks = trim_padding(tokens) if "trimmed" in variant else np.asarray(tokens)

        def jax_image(enc=enc_img, v=variables, d=bool(donate)):
            x = jax.device_put(images) if d else images
            enc(v, x).block_until_ready()

        def jax_text(enc=enc_txt, v=variables, t=toks, d=bool(donate)):
            enc(v, jax.device_put(t) if d else t).block_until_ready()

        if "trimmed" not in variant:
            runs[("image", variant)] = jax_image
        runs[("text", variant)] = jax_text

    with jax.default_matmul_precision(FLAGS.precision):
        for fn in runs.values():  # warm-up (compiles)
            fn()
            fn()
        times = {k: [] for k in runs}
        for _ in range(FLAGS.reps):  # alternate implementations within every repetition
            for key, fn in runs.items():
                times[key].append(_time(fn, FLAGS.iters))

    print(f"\n{FLAGS.model}, batch {b}, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
          f"median of {FLAGS.reps} alternating reps x {FLAGS.iters} batches, matmul precision {FLAGS.precision}, "
          f"XLA single-threaded {_SINGLE}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'tower':<6} {'implementation':<18} {'items/s':>10} {'vs open_clip':>13}")
    for tower in ("image", "text"):
        base = b / statistics.median(times[(tower, "open_clip")])
        for (tw, name), ts in times.items():
            if tw != tower:
                continue
            rate = b / statistics.median(ts)
            print(f"{tower:<6} {name:<18} {rate:>10.1f} {rate / base:>12.2f}x")


if __name__ == "__main__":
    app.run(main)
