"""Search benchmarks: exact (jitted, chunked) vs approximate (usearch HNSW) top-10, and retrieval
quality of a tiny trained CLIP on the built-in shapes + digits.

1. Speed and agreement (default):

    python benchmarks/search.py --num=100000 --dim=512 --queries=100 --reps=5 --data=clustered

   ``--num`` random unit vectors are written as a clipjax search index (float16 chunks, the
   default storage). Queries are scored by
     numpy (reference)   the whole float32 matrix in RAM: one matmul + argpartition
     clipjax exact       Index.search: jitted top-k over 65,536-row blocks read from the chunk files
     usearch (approx)    Index.search(approximate=True), HNSW (connectivity 16, expansion_add 64,
                         expansion_search 128 = the defaults of clipjax.search.HNSWParams)
   for one query and for a batch of ``--queries``; repetitions alternate the methods; the table
   shows the median and the ratio to the numpy reference, and the fraction of the exact top-10
   that each method returns (agreement). Data: ``clustered`` = 2,000 random centres with points
   spread around them (neighbourhoods exist, as with real embeddings); ``uniform`` = i.i.d. on the
   sphere (no neighbourhood structure: HNSW's worst case, all distances nearly equal).

2. Retrieval quality (``--quality``), with a CLIP trained by the project's trainer, e.g.

    python -m clipjax.train --config=configs/clip/digits_tiny.py --config.data.source=shapes \\
        --config.total_steps=400 --config.eval.linear_probe=False --workdir=/tmp/clip_shapes
    python benchmarks/search.py --quality --config=configs/clip/digits_tiny.py --workdir=/tmp/clip_shapes

   The collection: the 864 held-out shapes (indices 8640.. of ShapesSource, 64 px PNG), the 359
   held-out digits (32 px PNG) and one corrupt file. 48 text queries "a {colour} {shape}" ->
   precision@10 (colour, shape, both) with chance levels; image queries (every 5th image) -> how
   often the query image itself is the top hit.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("num", 100_000, "index rows (random vectors)")
flags.DEFINE_integer("dim", 512, "embedding dimension")
flags.DEFINE_integer("queries", 100, "queries in the batched workload")
flags.DEFINE_integer("reps", 5, "timed repetitions per method (alternating)")
flags.DEFINE_list("data", ["clustered"], "clustered and/or uniform")
flags.DEFINE_bool("quality", False, "run the retrieval-quality benchmark instead")
flags.DEFINE_string("config", "configs/clip/digits_tiny.py", "--quality: the training run's config file")
flags.DEFINE_string("workdir", "", "--quality: the training run's workdir")
flags.DEFINE_string("tmp", "", "scratch folder ('' = a temporary one, deleted at the end)")
FLAGS = flags.FLAGS


def _unit(a):
    import numpy as np
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _data(kind, n, d, q, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((q, d)))
    centres = _unit(rng.standard_normal((2000, d)))
    noise = 1.0 / np.sqrt(d)  # neighbours at cosine ~0.5 of each other, others ~0
    x = _unit(centres[rng.integers(0, 2000, n)] + noise * rng.standard_normal((n, d)))
    qs = _unit(centres[rng.integers(0, 2000, q)] + noise * rng.standard_normal((q, d)))
    return x, qs


def speed(scratch):
    import numpy as np
    from clipjax.search import Index

    def numpy_topk(x, q, k=10):
        s = q @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)

    table = []
    for kind in FLAGS.data:
        x, qs = _data(kind, FLAGS.num, FLAGS.dim, FLAGS.queries)
        out = os.path.join(scratch, f"vectors_{kind}_{FLAGS.num}_{FLAGS.dim}")
        if os.path.exists(os.path.join(out, "index.json")):  # --tmp: reuse the index and its graph
            index = Index.open(out)
        else:
            index = Index.from_embeddings(out, x, dtype="float16")
        x16 = index.embeddings()  # the stored (float16) vectors, as every method sees them
        t0 = time.perf_counter()
        index.approximate_index()
        build_s = time.perf_counter() - t0
        truth = index.search(qs, k=10).ids
        methods = {
            "numpy (reference)": lambda q: numpy_topk(x16, q),
            "clipjax exact": lambda q: index.search(q, k=10).ids,
            "usearch (approx)": lambda q: index.search(q, k=10, approximate=True).ids,
        }
        agree = {}
        for name, fn in methods.items():
            ids = fn(qs)
            agree[name] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
        for batch in (1, FLAGS.queries):
            q = qs[:batch]
            for fn in methods.values():
                fn(q)  # warm-up: compile / load
            times = {name: [] for name in methods}
            for _ in range(FLAGS.reps):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(q)
                    times[name].append(time.perf_counter() - t0)
            ref = statistics.median(times["numpy (reference)"])
            for name in methods:
                med = statistics.median(times[name])
                table.append((kind, name, batch, med * 1e3, med * 1e3 / batch, ref / med, agree[name]))
        print(f"[{kind}] {FLAGS.num} x {FLAGS.dim}: HNSW build (or load) {build_s:.1f} s", flush=True)
    print(f"\nTop-10 search over {FLAGS.num:,} random unit vectors, d={FLAGS.dim}, float16 storage; "
          f"median of {FLAGS.reps} alternating repetitions")
    print(f"{'data':<10} {'method':<18} {'batch':>5} {'ms/batch':>9} {'ms/query':>9} {'speed vs ref':>12} "
          f"{'top-10 agreement':>17}")
    for kind, name, batch, ms, msq, ratio, ag in table:
        print(f"{kind:<10} {name:<18} {batch:>5} {ms:>9.2f} {msq:>9.3f} {ratio:>11.2f}x {ag:>17.3f}")


def quality(scratch):
    import numpy as np
    from PIL import Image
    from clipjax.data.builtin import SHAPE_COLOURS, SHAPE_NAMES, DigitsSource, render_shape, shape_attributes
    from clipjax.search import Index

    if not FLAGS.workdir:
        raise app.UsageError("--quality needs --workdir (a clipjax.train run) and its --config")
    col = os.path.join(scratch, "collection")
    os.makedirs(os.path.join(col, "shapes"))
    os.makedirs(os.path.join(col, "digits"))
    truth = {}
    for g in range(8640, 8640 + 864):
        rel = f"shapes/{g:05d}.png"
        Image.fromarray(render_shape(g, 64)).save(os.path.join(col, rel))
        truth[rel] = shape_attributes(g)
    digits = DigitsSource("test", 32)
    for i in range(len(digits)):
        rel = f"digits/{i:04d}.png"
        Image.fromarray(digits.images[i]).save(os.path.join(col, rel))
        truth[rel] = {"digit": int(digits.labels[i])}
    with open(os.path.join(col, "shapes", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    index = Index.build(col, os.path.join(scratch, "index"), config=FLAGS.config, workdir=FLAGS.workdir,
                        progress=False)
    r = index.build_report
    print(f"index: {len(index)} rows, {r.embedded / r.seconds:.1f} img/s (incl. model load), "
          f"bad: {[(b['id'], b['reason']) for b in r.bad]}")
    colours = list(SHAPE_COLOURS)
    combos = [(c, s) for c in range(len(colours)) for s in range(len(SHAPE_NAMES))]
    res = index.search(texts=[f"a {colours[c]} {SHAPE_NAMES[s]}" for c, s in combos], k=10)
    hits = np.array([[[truth[row["id"]].get("colour") == c, truth[row["id"]].get("shape") == s]
                      for row in rows] for (c, s), rows in zip(combos, res.rows)])  # query x 10 x 2
    n = len(index)
    print(f"\ntext queries 'a {{colour}} {{shape}}' (48), precision@10 over {n} images:")
    print(f"{'match':<14} {'precision@10':>12} {'chance':>8} {'x chance':>9}")
    for name, p, chance in (("colour", hits[..., 0].mean(), 108 / n), ("shape", hits[..., 1].mean(), 144 / n),
                            ("colour+shape", hits.all(-1).mean(), 18 / n)):
        print(f"{name:<14} {p:>12.3f} {chance:>8.3f} {p / chance:>8.1f}x")
    ids = index.ids()
    sel = list(range(0, n, 5))
    res = index.search(images=[os.path.join(col, ids[i]) for i in sel], k=1)
    self_top1 = np.mean([rows[0]["row"] == i for i, rows in zip(sel, res.rows)])
    print(f"\nimage queries ({len(sel)}): the query itself is the top hit in {self_top1:.1%}")


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint read at INFO
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scratch = FLAGS.tmp or tempfile.mkdtemp(prefix="clipjax_search_bench_")
    os.makedirs(scratch, exist_ok=True)
    try:
        quality(scratch) if FLAGS.quality else speed(scratch)
    finally:
        if not FLAGS.tmp:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
