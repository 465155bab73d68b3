r"""Images/s of the CLIP training input pipeline (read + decode + random-resized-crop + tokenize + batch).

    python benchmarks/input_pipeline.py [--batch_size 64] [--batches 8] [--reps 5]

Rows:
  digits      built-in sklearn digits (32 px arrays in memory) -> ``--digits_size`` px
  shards      TFRecord shards of 224 px JPEGs written by clipjax.data.shards -> 224 px
              (data.train_resize='fast', the default; and 'pil', the PIL-exact resize)
  reference   a minimal tf.data reader of the same shards: sequential TFRecordDataset, parse,
              decode_jpeg, centre resize to 224, batch -- no random access, no augmentation, no
              tokenization. It bounds what decoding alone costs on this machine.

Each repetition builds a fresh iterator (at a new start step), pulls 2 warm-up batches, then
times ``--batches`` batches. Repetitions alternate between the rows; the table gives the median
and the ratio of the shards row to the reference.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402


def make_jpeg_folder(folder: str, n: int, size: int = 224) -> None:
    """n photo-like 224 px JPEGs (shapes over gradients + noise) with sidecar captions."""
    from PIL import Image
    from clipjax.data import builtin
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        rng = np.random.default_rng(i)
        shape = builtin.render_shape(i, size).astype(np.float32)
        grad = (np.stack([yy, xx, 1 - yy], -1) * rng.uniform(40, 120, 3)).astype(np.float32)
        img = np.clip(shape + grad + rng.normal(0, 6, shape.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        attrs = builtin.shape_attributes(i)
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(builtin.shape_captions(attrs)[i % len(builtin.SHAPE_CAPTION_TEMPLATES)])


def ours(config, start):
    from clipjax.data import pipeline
    return pipeline.make_train_iterator(config, start)


def reference(shard_dir, batch_size, size, start):
    import tensorflow as tf
    from clipjax.data import sources
    files = sources._glob_shards(shard_dir)
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "caption": tf.io.VarLenFeature(tf.string)}

    def load(record):
        ex = tf.io.parse_single_example(record, spec)
        img = tf.io.decode_jpeg(ex["image"], channels=3)
        return tf.image.resize(img, [size, size], method="bicubic", antialias=True)
    ds = tf.data.TFRecordDataset(files).repeat().skip(start * batch_size)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
    return iter(ds.prefetch(2).as_numpy_iterator())


def measure(make_iter, batches: int, batch_size: int) -> float:
    it = make_iter()
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--num_images", type=int, default=512)
    ap.add_argument("--num_shards", type=int, default=8)
    ap.add_argument("--digits_size", type=int, default=224)
    args = ap.parse_args()

    import tensorflow as tf
    from clipjax.data import pipeline
    from clipjax.data.shards import convert

    tmp = tempfile.mkdtemp(prefix="clipjax_bench_")
    imgs, shards = os.path.join(tmp, "imgs"), os.path.join(tmp, "shards")
    os.makedirs(imgs)
    make_jpeg_folder(imgs, args.num_images)
    convert(imgs, shards, args.num_shards, log=lambda *a: None)

    b = args.batch_size
    digits_cfg = ml_collections.ConfigDict(dict(seed=0, batch_size=b, data=pipeline.data_config(
        source="digits", image_size=args.digits_size, builtin_size=32)))
    shards_cfg = ml_collections.ConfigDict(dict(seed=0, batch_size=b, data=pipeline.data_config(
        source="shards", path=shards, image_size=224)))
    pil_cfg = ml_collections.ConfigDict(shards_cfg.to_dict())
    pil_cfg.data.train_resize = "pil"
    rows = {
        f"digits ({args.digits_size} px)": lambda s: ours(digits_cfg, s),
        "shards (224 px JPEG)": lambda s: ours(shards_cfg, s),
        "shards, train_resize='pil'": lambda s: ours(pil_cfg, s),
        "reference: plain TFRecord decode": lambda s: reference(shards, b, 224, s),
    }
    results = {k: [] for k in rows}
    for rep in range(args.reps):
        for name, fn in rows.items():  # alternate so machine load hits every row alike
            results[name].append(measure(lambda: fn(rep * (args.batches + 2)), args.batches, b))

    print(f"\ninput pipeline, batch {b}, {args.batches} timed batches x {args.reps} reps, "
          f"{os.cpu_count()} CPUs, tf {tf.__version__}")
    print(f"{'pipeline':<36} {'images/s (median)':>18} {'min':>8} {'max':>8}")
    med = {k: statistics.median(v) for k, v in results.items()}
    for name, vals in results.items():
        print(f"{name:<36} {med[name]:>18.1f} {min(vals):>8.1f} {max(vals):>8.1f}")
    ratio = med["shards (224 px JPEG)"] / med["reference: plain TFRecord decode"]
    print(f"ratio shards / reference: {ratio:.2f} (ours adds random access, random-resized-crop "
          f"and tokenization)")


if __name__ == "__main__":
    main()
