"""``python -m clipjax.search {index,query,dedup}`` (absl flags, like every clipjax entry point).

    python -m clipjax.search index --images=DIR_OR_SHARDS --weights=ViT-B-32.pt --model=ViT-B-32 --out=IDX
    python -m clipjax.search index --images=DIR --config=configs/clip/digits_tiny.py --workdir=RUN --out=IDX
    python -m clipjax.search query IDX --text="a red circle" --top_k=10 [--approx] [--format=json|html]
    python -m clipjax.search query IDX --image=photo.jpg --format=html --output=results.html
    python -m clipjax.search dedup IDX --threshold=0.95 [--format=json|html]

``--top-k`` is accepted as a spelling of ``--top_k`` (any of this tool's flags may use dashes).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from clipjax import cli

FLAGS = flags.FLAGS
# model (index; optional for query/dedup, which default to the model recorded in the index)
def _define_flags():
    """Defined when the CLI runs, not at import: absl flags are global and other CLIs share names."""
    flags.DEFINE_string("weights", "", "Weights file: clipjax .msgpack, open_clip/OpenAI .pt/.bin/.safetensors.")
    flags.DEFINE_string("model", "", "Registry model name (clipjax.models.list_models()); needed for state-dict "
                        "files whose architecture is not stored. A name without --weights = random init.")
    flags.DEFINE_integer("step", -1, "With --config/--workdir: checkpoint step to use (-1 = latest).")
    # index
    flags.DEFINE_string("images", "", "index: a folder of images (+ sidecar .txt captions), a .csv/.jsonl "
                        "manifest, or a folder/glob of TFRecord shards from python -m clipjax.data.shards.")
    flags.DEFINE_string("out", "", "index: the index folder to create or extend.")
    flags.DEFINE_integer("batch_size", 64, "index: images per embedding batch (split over local devices).")
    flags.DEFINE_integer("chunk_rows", 4096, "index: rows per chunk file (the unit of resumption).")
    flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "index: storage dtype of the embeddings.")
    flags.DEFINE_integer("num_threads", 8, "index: threads reading and preprocessing images.")
    flags.DEFINE_integer("worker_index", 0, "index: this worker's number when several hosts/processes share "
                         "one index (each embeds the items whose id hashes to it).")
    flags.DEFINE_integer("num_workers", 1, "index: number of such workers.")
    flags.DEFINE_bool("overwrite", False, "index: delete the existing index in --out and rebuild it.")
    flags.DEFINE_bool("progress", True, "index: show a progress bar.")
    # query / dedup
    flags.DEFINE_multi_string("text", [], "query: a text query (repeat for several).")
    flags.DEFINE_multi_string("image", [], "query: an image file query (repeat for several).")
    flags.DEFINE_integer("top_k", 10, "query: results per query.")
    flags.DEFINE_bool("approx", False, "query: use the approximate usearch index (pip install clipjax[search]).")
    flags.DEFINE_integer("expansion_search", 0, "query --approx: width of the HNSW walk (0 = the width calibrated "
                         "when the graph was built; higher = closer to exact, slower).")
    flags.DEFINE_integer("oversample", 0, "query --approx: the graph proposes oversample x top_k candidates, "
                         "re-scored exactly (0 = the graph's setting, 4).")
    flags.DEFINE_integer("block_rows", 65536, "query/dedup: index rows scored per jitted block (memory bound).")
    flags.DEFINE_enum("format", "table", ["table", "json", "html"], "query/dedup: output format.")
    flags.DEFINE_string("output", "", "query/dedup: write the output to this file ('' = stdout; html needs a file).")
    flags.DEFINE_float("threshold", 0.95, "dedup: cosine similarity at or above which two rows are duplicates.")

COMMANDS = ("index", "query", "dedup")
_USAGE = ("usage: python -m clipjax.search index --images=... --out=IDX (--weights=... | --config=... "
          "--workdir=...) | query IDX (--text=... | --image=...) | dedup IDX")


def _model_kwargs():
    from ml_collections import config_flags
    config = cli._CONFIG.value
    config_file = config_flags.get_config_filename(FLAGS["config"]) if config is not None else None
    return dict(model=FLAGS.model or None, weights=FLAGS.weights or None, config=config,
                workdir=FLAGS.workdir or None, step=None if FLAGS.step < 0 else FLAGS.step,
                config_file=config_file)


def _emit(text: str) -> None:
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {FLAGS.output}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _open(path: str):
    from clipjax.search import Index, load_encoder
    kw = _model_kwargs()
    explicit = any(kw[k] for k in ("model", "weights", "workdir")) or kw["config"] is not None
    return Index.open(path, encoder=load_encoder(**kw) if explicit else None)


def cmd_index(args) -> int:
    from clipjax.search import Index
    if args:
        raise app.UsageError(f"index takes no positional arguments (got {args}); use --images= and --out=")
    if not FLAGS.out:
        raise app.UsageError("index needs --out=INDEX_DIR")
    index = Index.build(FLAGS.images, FLAGS.out, **_model_kwargs(), batch_size=FLAGS.batch_size,
                        chunk_rows=FLAGS.chunk_rows, dtype=FLAGS.dtype, num_threads=FLAGS.num_threads,
                        worker_index=FLAGS.worker_index, num_workers=FLAGS.num_workers,
                        overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    r = index.build_report
    print(f"index {FLAGS.out}: {len(index)} rows; embedded {r.embedded} new, {r.already} already indexed, "
          f"{len(r.bad)} bad" + (f", {r.other_workers} left to other workers" if r.other_workers else "")
          + f" ({r.seconds:.1f} s, {r.embedded / max(r.seconds, 1e-9):.1f} img/s)")
    for b in r.bad[:20]:
        print(f"  skipped {b['id']}: {b['reason']}" + (f" ({b['detail'][:120]})" if b.get("detail") else ""))
    if len(r.bad) > 20:
        print(f"  ... {len(r.bad) - 20} more")
    if r.bad:
        print(f"  bad items listed in {os.path.join(FLAGS.out, 'bad*.jsonl')}")
    return 0


def cmd_query(args) -> int:
    from clipjax.search import render
    if len(args) != 1:
        raise app.UsageError("query takes exactly one INDEX_DIR")
    if bool(FLAGS.text) == bool(FLAGS.image):
        raise app.UsageError("query needs --text=... or --image=... (one kind per call; repeat for several)")
    if FLAGS.format == "html" and not FLAGS.output:
        raise app.UsageError("--format=html needs --output=FILE.html")
    for name in ("expansion_search", "oversample"):
        if FLAGS[name].value < 0:
            raise app.UsageError(f"--{name}={FLAGS[name].value}: use 0 (the graph's setting) or a positive number")
    index = _open(args[0])
    result = index.search(k=FLAGS.top_k, texts=FLAGS.text or None, images=FLAGS.image or None,
                          approximate=FLAGS.approx, block_rows=FLAGS.block_rows,
                          expansion_search=FLAGS.expansion_search or None, oversample=FLAGS.oversample or None)
    _emit({"table": render.table, "json": render.to_json, "html": render.gallery}[FLAGS.format](result))
    return 0


def cmd_dedup(args) -> int:
    from clipjax.search import render
    if len(args) != 1:
        raise app.UsageError("dedup takes exactly one INDEX_DIR")
    if FLAGS.format == "html" and not FLAGS.output:
        raise app.UsageError("--format=html needs --output=FILE.html")
    index = _open(args[0])
    pairs, groups = index.dedup(FLAGS.threshold, block_rows=min(FLAGS.block_rows, 8192))
    fn = {"table": render.dedup_table, "json": render.dedup_json, "html": render.dedup_gallery}[FLAGS.format]
    _emit(fn(index, pairs, groups))
    return 0


def _main(argv) -> int:
    from absl import logging as absl_logging
    from clipjax.search.approx import ApproximateUnavailable
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint read at INFO
    from clipjax.search.encoder import SearchError
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"first argument: one of {', '.join(COMMANDS)}\n{_USAGE}")
    try:
        return {"index": cmd_index, "query": cmd_query, "dedup": cmd_dedup}[argv[1]](argv[2:])
    except (SearchError, ApproximateUnavailable, FileNotFoundError) as e:
        print(cli.one_line_error(e), file=sys.stderr)
        return 2
    except (KeyError, AttributeError) as e:  # a bad --config.* override, read lazily
        print(cli._override_error(e, sys.argv), file=sys.stderr)
        return 2
    except ValueError as e:
        from clipjax.config import ConfigError
        if isinstance(e, ConfigError) or getattr(e, "user_error", False):
            print(cli.one_line_error(e), file=sys.stderr)
            return 2
        raise


def _normalise_dashes(argv: list[str]) -> list[str]:
    """``--top-k=5`` -> ``--top_k=5`` for this tool's own flags (not --config.* overrides)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("--config"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def run() -> None:
    import logging
    logging.getLogger("absl").setLevel(logging.WARNING)
    sys.argv = _normalise_dashes(sys.argv)
    _define_flags()
    app.run(_main, flags_parser=cli._parse_flags_or_exit)


if __name__ == "__main__":
    run()
