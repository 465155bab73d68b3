"""Search benchmarks: exact (jitted, chunked) vs approximate (usearch HNSW + exact re-ranking)
top-10, and retrieval quality of a tiny trained CLIP on the built-in shapes + digits.

1. Speed and agreement (default), both data sets in one run:

    python benchmarks/search.py --num=100000 --dim=512 --queries=100 --reps=5 --data=clustered,uniform

   ``--num`` random unit vectors are written as a clipjax search index (float16 chunks, the
   default storage); ``--queries`` more, drawn the same way, are the queries. Methods:
     numpy (reference)   the whole float32 matrix in RAM: one matmul + argpartition
     clipjax exact       Index.search: jitted top-k over 65,536-row blocks read from the chunk files
     usearch (approx)    Index.search(approximate=True): the HNSW graph (clipjax.search.HNSWParams
                         defaults unless --connectivity/--expansion_add/--quantization/
                         --oversample/--target_recall say otherwise) proposes oversample x 10
                         candidates, re-scored exactly; the walk width is the one calibrated at
                         build time (or --expansion_search)
     usearch ef=N        the same graph with a fixed walk width N, for each N in --extra_ef
   timed for one query at a time (the mean over 10 different queries) and for a batch of
   ``--queries``; repetitions alternate the methods; the
   table shows the median, per query, the ratio to the numpy reference, and the fraction of the
   exact top-10 that each method returns (agreement@10, the mean over queries). The graph's build
   time (add + calibration) and its calibration are printed per data set.
   Data: ``uniform`` = i.i.d. standard normal vectors normalised to unit length (uniform on the
   sphere S^(d-1); no neighbourhood structure: HNSW's worst case, all distances nearly equal);
   ``clustered`` = 2,000 uniform random unit centres, each point = a random centre + N(0, 1/d)
   noise per component, normalised (neighbourhoods exist, as with real embeddings).

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
flags.DEFINE_list("data", ["clustered", "uniform"], "clustered and/or uniform")
flags.DEFINE_integer("connectivity", 0, "HNSW connectivity (0 = the HNSWParams default)")
flags.DEFINE_integer("expansion_add", 0, "HNSW expansion_add (0 = the HNSWParams default)")
flags.DEFINE_string("quantization", "", "HNSW vector storage: i8, f16, f32 ('' = the HNSWParams default)")
flags.DEFINE_integer("oversample", 0, "candidates re-ranked per result (0 = the HNSWParams default)")
flags.DEFINE_float("target_recall", 0.0, "calibration target (0 = the HNSWParams default)")
flags.DEFINE_integer("expansion_search", 0, "fixed walk width for the graph (0 = calibrated)")
flags.DEFINE_list("extra_ef", [], "also time the graph at these fixed walk widths, e.g. 128,512")
flags.DEFINE_bool("quality", False, "run the retrieval-quality benchmark instead")
flags.DEFINE_string("config", "configs/clip/digits_tiny.py", "--quality: the training run's config file")
flags.DEFINE_string("workdir", "", "--quality: the training run's workdir")
flags.DEFINE_string("tmp", "", "scratch folder ('' = a temporary one, deleted at the end); an index "
                    "(and graph, if built with the same settings) left there by an earlier run is reused")
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


def _params():
    from clipjax.search import HNSWParams
    p = HNSWParams()
    for name in ("connectivity", "expansion_add", "quantization", "oversample", "target_recall", "expansion_search"):
        if getattr(FLAGS, name):
            setattr(p, name, getattr(FLAGS, name))
    return p.validate()


def speed(scratch):
    import numpy as np
    from clipjax.search import Index
    from clipjax.search.approx import agreement

    def numpy_topk(x, q, k=10):
        s = q @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)

    params = _params()
    print(f"HNSW settings: {params}", flush=True)
    table, builds = [], []
    for kind in FLAGS.data:
        if kind not in ("clustered", "uniform"):
            raise app.UsageError(f"--data={kind}: use clustered and/or uniform")
        x, qs = _data(kind, FLAGS.num, FLAGS.dim, FLAGS.queries)
        out = os.path.join(scratch, f"vectors_{kind}_{FLAGS.num}_{FLAGS.dim}")
        if os.path.exists(os.path.join(out, "index.json")):  # --tmp: reuse the index and its graph
            index = Index.open(out)
        else:
            index = Index.from_embeddings(out, x, dtype="float16")
        x16 = index.embeddings()  # the stored (float16) vectors, as every method sees them
        t0 = time.perf_counter()
        index.approximate_index(params)
        load_s = time.perf_counter() - t0
        info = index.approximate_info()
        cal = info["calibration"]
        builds.append((kind, info["build_seconds"], load_s, cal))
        print(f"[{kind}] graph build {info['build_seconds']:.1f} s (this run: build or load {load_s:.1f} s); "
              f"calibrated expansion_search={cal['expansion_search']} (held-out agreement {cal['recall']}, "
              f"ladder {cal.get('ladder')})", flush=True)
        truth = index.search(qs, k=10).ids
        methods = {
            "numpy (reference)": lambda q: numpy_topk(x16, q),
            "clipjax exact": lambda q: index.search(q, k=10).ids,
            "usearch (approx)": lambda q: index.search(q, k=10, approximate=True).ids,
        }
        for ef in FLAGS.extra_ef:
            methods[f"usearch ef={int(ef)}"] = (lambda e: lambda q: index.search(
                q, k=10, approximate=True, expansion_search=e).ids)(int(ef))
        agree = {name: agreement(fn(qs), truth) for name, fn in methods.items()}
        singles = min(10, FLAGS.queries)
        for batch in (1, FLAGS.queries):
            # batch 1: `singles` different queries one at a time (walk lengths vary by query)
            calls = [qs[i:i + 1] for i in range(singles)] if batch == 1 else [qs]
            for fn in methods.values():
                fn(calls[0])  # warm-up: compile / load
            times = {name: [] for name in methods}
            for _ in range(FLAGS.reps):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    for q in calls:
                        fn(q)
                    times[name].append((time.perf_counter() - t0) / len(calls))
            ref = statistics.median(times["numpy (reference)"])
            for name in methods:
                med = statistics.median(times[name])
                table.append((kind, name, batch, med * 1e3, med * 1e3 / batch, ref / med, agree[name]))
    print(f"\nTop-10 search over {FLAGS.num:,} random unit vectors, d={FLAGS.dim}, float16 storage, "
          f"{FLAGS.queries} queries; median of {FLAGS.reps} alternating repetitions; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'data':<10} {'method':<18} {'batch':>5} {'ms/batch':>9} {'ms/query':>9} {'speed vs ref':>12} "
          f"{'agreement@10':>13}")
    for kind, name, batch, ms, msq, ratio, ag in table:
        print(f"{kind:<10} {name:<18} {batch:>5} {ms:>9.2f} {msq:>9.3f} {ratio:>11.2f}x {ag:>13.3f}")
    print(f"\n{'data':<10} {'graph build s':>13} {'of which calibration s':>22} {'calibrated ef':>13} "
          f"{'held-out agreement':>18} {'rows scored per query':>21}")
    for kind, build_s, _, cal in builds:
        print(f"{kind:<10} {build_s:>13.1f} {str(cal.get('seconds')):>22} {cal['expansion_search']:>13} "
              f"{str(cal['recall']):>18} {str(cal.get('fraction_of_rows')):>21}")


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
