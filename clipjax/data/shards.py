r"""Convert images + captions to TFRecord shards for training.

    python -m clipjax.data.shards --input DIR_OR_MANIFEST --output OUT_DIR --num_shards N

Input: a folder of images with sidecar captions (``cat.jpg`` + ``cat.txt``, searched
recursively), or a ``.csv`` / ``.jsonl`` manifest with a path and a caption column (optional
``label``, ``key``; a JSON list of captions gives several captions per image).

Every image is decoded fully with PIL and converted to 8-bit RGB, so the training pipeline never
meets an image it cannot decode:

* converted, kept (counted under ``converted``): CMYK JPEG, images with alpha (composited on
  white), palette, greyscale, 16-bit, EXIF-rotated; re-encoded as JPEG when the source was JPEG,
  else as lossless PNG (``--reencode`` forces one). Plain RGB JPEG/PNG bytes are stored unchanged.
* skipped (counted under ``skipped`` by reason): ``missing_file``, ``empty_file``,
  ``corrupt_image`` (truncated or undecodable), ``image_too_large`` (> ``--max_pixels``),
  ``missing_caption``, ``empty_caption``, ``caption_not_utf8``, ``bad_manifest_row``.
* captions longer than 1000 characters are truncated (``captions_truncated``).

Output: ``OUT_DIR/{prefix}-{k:05d}-of-{N:05d}.tfrecord`` (+ ``.idx`` byte offsets for random
access), ``dataset.json`` (shards and counts) and ``report.json`` (written, skipped by reason,
converted, the first skipped rows with details); the report is also printed. Good rows are dealt
round-robin over the shards (after an optional seeded shuffle), so shard sizes differ by <= 1.
"""
from __future__ import annotations

import collections
import json
import os
import sys
from typing import Optional

import numpy as np
from absl import app, flags

from clipjax.data import sources

FLAGS = flags.FLAGS
def _define_flags():
    """Defined when the CLI runs, not at import: several CLIs' modules share one process in tests
    and libraries, and absl flags are global."""
    flags.DEFINE_string("input", None, "Folder of images with sidecar .txt captions, or a .csv/.jsonl manifest.")
    flags.DEFINE_string("output", None, "Output folder for the shards, dataset.json and report.json.")
    flags.DEFINE_integer("num_shards", 8, "Number of TFRecord shards (use a multiple of the number of hosts).")
    flags.DEFINE_string("prefix", "shard", "Shard file name prefix.")
    flags.DEFINE_enum("reencode", "auto", ["auto", "jpeg", "png"],
                      "Format for images that must be re-encoded; auto: JPEG sources -> JPEG, lossless -> PNG.")
    flags.DEFINE_integer("quality", 95, "JPEG quality for re-encoded images.")
    flags.DEFINE_integer("max_side", 0, "If > 0, downscale images whose shorter side exceeds this.")
    flags.DEFINE_integer("max_pixels", sources.DEFAULT_MAX_PIXELS, "Skip images with more pixels than this.")
    flags.DEFINE_integer("shuffle_seed", 0, "Shuffle rows with this seed before sharding; -1 keeps input order.")
    flags.DEFINE_integer("num_workers", 1, "Processes validating images in parallel.")

MAX_REPORTED_SKIPS = 1000


def process_row(row: sources.Row, reencode: str = "auto", quality: int = 95, max_side: int = 0,
                max_pixels: int = sources.DEFAULT_MAX_PIXELS) -> dict:
    """Validates one row. Returns {'record': bytes, 'conversions': [...], 'truncated': bool}
    or {'skip': reason, 'detail': str}."""
    try:
        if row.attrs and "__error__" in row.attrs:
            raise sources.SkipExample("bad_manifest_row", row.attrs["__error__"])
        raw_caps = row.caption if isinstance(row.caption, (list, tuple)) else [row.caption]
        captions, truncated = [], False
        for c in raw_caps:
            try:
                text, cut = sources.read_caption(c)
            except sources.SkipExample as e:
                if len(raw_caps) == 1 or e.reason == "caption_not_utf8":
                    raise
                continue  # one empty caption among several: drop that caption only
            captions.append(text)
            truncated |= cut
        if not captions:
            raise sources.SkipExample("empty_caption")
        try:
            with open(row.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise sources.SkipExample("missing_file", row.path)
        except OSError as e:
            raise sources.SkipExample("unreadable_file", f"{row.path}: {e}")
        img, conversions, fmt = sources.load_image(data, max_pixels, max_side)
        payload = sources.encode_for_shard(img, conversions, data, fmt, reencode, quality)
        record = sources.make_tf_example(payload, captions, row.key, row.label)
        return {"record": record, "conversions": conversions, "truncated": truncated}
    except sources.SkipExample as e:
        return {"skip": e.reason, "detail": e.detail}


def _process_star(args):
    return process_row(*args)


def convert(input_path: str, output: str, num_shards: int, prefix: str = "shard", reencode: str = "auto",
            quality: int = 95, max_side: int = 0, max_pixels: int = sources.DEFAULT_MAX_PIXELS,
            shuffle_seed: int = 0, num_workers: int = 1, log=print) -> dict:
    """Writes the shards and returns the report (also written to ``output/report.json``).

    Raises DataError when no row is usable (the report is still written).
    """
    import tensorflow as tf
    if num_shards < 1:
        raise sources.DataError(f"--num_shards={num_shards}: must be >= 1")
    rows = sources.list_rows(input_path)
    if shuffle_seed >= 0:
        order = np.random.default_rng(shuffle_seed).permutation(len(rows))
        rows = [rows[i] for i in order]
    os.makedirs(output, exist_ok=True)
    names = [f"{prefix}-{k:05d}-of-{num_shards:05d}.tfrecord" for k in range(num_shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(output, n)) for n in names]
    offsets = [[] for _ in range(num_shards)]
    positions = [0] * num_shards
    skipped, converted = collections.Counter(), collections.Counter()
    skipped_rows, truncated, written = [], 0, 0

    args = [(r, reencode, quality, max_side, max_pixels) for r in rows]
    if num_workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap(_process_star, args, chunksize=16)
    else:
        pool, results = None, map(_process_star, args)
    try:
        for row, res in zip(rows, results):
            if "skip" in res:
                skipped[res["skip"]] += 1
                if len(skipped_rows) < MAX_REPORTED_SKIPS:
                    skipped_rows.append({"key": row.key, "path": row.path, "reason": res["skip"],
                                         "detail": res["detail"][:300]})
                continue
            k = written % num_shards
            writers[k].write(res["record"])
            offsets[k].append(positions[k])
            positions[k] += sources.record_size(len(res["record"]))
            converted.update(res["conversions"])
            truncated += int(res["truncated"])
            written += 1
    finally:
        if pool is not None:
            pool.close()
        for w in writers:
            w.close()
    for n, offs in zip(names, offsets):
        np.asarray(offs, "<i8").tofile(os.path.join(output, n + ".idx"))
    shards = [{"file": n, "num_records": len(o)} for n, o in zip(names, offsets)]
    labels = sorted({r.label for r in rows if r.label != sources.NO_LABEL})
    with open(os.path.join(output, "dataset.json"), "w") as f:
        json.dump({"format": "clipjax-shards", "version": 1, "num_examples": written, "shards": shards,
                   "classnames": None, "has_labels": bool(labels)}, f, indent=1)
    report = {"input": input_path, "output": output, "rows": len(rows), "written": written,
              "skipped_total": int(sum(skipped.values())), "skipped": dict(sorted(skipped.items())),
              "converted": dict(sorted(converted.items())), "captions_truncated": truncated,
              "shards": shards, "skipped_examples": skipped_rows}
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    summary = {k: report[k] for k in ("rows", "written", "skipped_total", "skipped", "converted",
                                      "captions_truncated")}
    log(json.dumps(summary, indent=1))
    if written == 0:
        raise sources.DataError(f"{input_path}: none of the {len(rows)} rows is usable "
                                f"(skipped: {dict(skipped)}); see {output}/report.json for each row")
    if written < num_shards:
        log(f"warning: only {written} examples for {num_shards} shards; some shards are empty")
    return report


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    try:
        convert(FLAGS.input, FLAGS.output, FLAGS.num_shards, FLAGS.prefix, FLAGS.reencode,
                FLAGS.quality, FLAGS.max_side, FLAGS.max_pixels, FLAGS.shuffle_seed, FLAGS.num_workers)
    except sources.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
