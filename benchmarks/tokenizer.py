"""Tokenizer throughput: clipjax.tokenizer vs open_clip's SimpleTokenizer (the reference).

Both tokenise the same texts in one process, repetitions alternate reference / ours, the
table shows median texts/s and the ratio. Every workload first checks that both return the
same ids.

    python benchmarks/tokenizer.py --n=10000 --reps=7

Workloads (captions come from tests/clipjax/data/corpus.py: web/COCO-style English with ~8%
carrying a curly quote, accent, HTML entity, dash or emoji):
  captions, warm        the same n captions every repetition (both word caches warm)
  captions, new batches a fresh set of n captions each repetition, one tokenizer instance
                        each (a data pipeline streaming new text)
  captions, cold        fresh tokenizer instances each repetition (empty caches)
  adversarial, warm     mixed_corpus: CJK, emoji, entities, mojibake, control chars, long text
  one text per call     captions tokenised one at a time (e.g. inside a tf.data map)
"""
import os
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("n", 10000, "texts per batch")
flags.DEFINE_integer("reps", 7, "timed repetitions per tokenizer (alternating)")
flags.DEFINE_integer("single", 2000, "texts for the one-text-per-call workload")
FLAGS = flags.FLAGS


def _timed(fn, texts):
    t0 = time.perf_counter()
    fn(texts)
    return time.perf_counter() - t0


def main(argv):
    del argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    from open_clip.tokenizer import SimpleTokenizer

    from clipjax.tokenizer import Tokenizer
    from tests.clipjax.data.corpus import captions, mixed_corpus

    n, reps = FLAGS.n, FLAGS.reps
    warm_texts = captions(n, seed=0)
    mixed = mixed_corpus(n // 2, seed=0)

    def ref_batch(tok):
        return lambda texts: tok(texts).numpy()

    def per_text(tok, convert):
        return lambda texts: [convert(tok(t)) for t in texts]

    rows = []

    def run(name, make_pair, texts_for_rep, count):
        ref_fn, ours_fn = make_pair()
        check = texts_for_rep(-1)
        np.testing.assert_array_equal(np.asarray(ours_fn(check)).reshape(len(check), -1),
                                      np.asarray(ref_fn(check)).reshape(len(check), -1))
        times = {"ref": [], "ours": []}
        for rep in range(reps):
            texts = texts_for_rep(rep)
            ref_fn, ours_fn = make_pair(rep)
            for who, fn in (("ref", ref_fn), ("ours", ours_fn)) if rep % 2 == 0 else \
                    (("ours", ours_fn), ("ref", ref_fn)):
                times[who].append(_timed(fn, texts))
        ref_rate = count / statistics.median(times["ref"])
        ours_rate = count / statistics.median(times["ours"])
        rows.append((name, count, ref_rate, ours_rate, ours_rate / ref_rate))

    shared = {"ref": SimpleTokenizer(), "ours": Tokenizer()}

    def warm_pair(rep=None):
        return ref_batch(shared["ref"]), shared["ours"]

    def cold_pair(rep=None):
        return ref_batch(SimpleTokenizer()), Tokenizer()

    stream = {"ref": SimpleTokenizer(), "ours": Tokenizer()}

    def stream_pair(rep=None):
        return ref_batch(stream["ref"]), stream["ours"]

    run("captions, warm", warm_pair, lambda rep: warm_texts, n)
    run("captions, new batches", stream_pair, lambda rep: captions(n, seed=1000 + rep), n)
    run("captions, cold", cold_pair, lambda rep: captions(n, seed=2000 + rep), n)
    run("adversarial, warm", warm_pair, lambda rep: mixed, len(mixed))
    single = warm_texts[:FLAGS.single]
    run("one text per call", lambda rep=None: (per_text(shared["ref"], lambda t: t.numpy()),
                                               per_text(shared["ours"], lambda t: t)),
        lambda rep: single, len(single))

    print(f"\nclipjax.tokenizer vs open_clip SimpleTokenizer — median of {reps} alternating "
          f"repetitions, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'workload':<24}{'texts':>7}{'open_clip texts/s':>19}{'clipjax texts/s':>17}"
          f"{'ratio':>8}")
    for name, count, ref_rate, ours_rate, ratio in rows:
        print(f"{name:<24}{count:>7}{ref_rate:>19,.0f}{ours_rate:>17,.0f}{ratio:>7.1f}x")


if __name__ == "__main__":
    app.run(main)
