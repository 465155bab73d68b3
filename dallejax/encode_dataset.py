"""Pre-tokenize an image-caption dataset for DALL-E training: captions -> CLIP BPE ids, images -> dVAE codes.

    python -m dallejax.encode_dataset --config=configs/dalle/digits.py --dvae=/tmp/dvae_digits \\
        --out=/tmp/digits_tokens [--split=train|eval] [--num_shards=4] [--batch=256]

then train on the tokens with ``--config.data.source=tokens --config.data.path=/tmp/digits_tokens``
(and ``--config.data.eval_path=`` a folder made with ``--split=eval`` for the held-out loss).

Input: whatever ``config.data`` describes for the CLIP pipeline (digits, shapes, TFDS, shards,
manifests), read in order with the pipeline's evaluation transform (short side resized to
``config.data.image_size``, centre crop), mapped to [0, 1] and encoded by the dVAE's argmax in
fixed-size jitted batches (the last one padded, so it compiles once). Unusable examples are skipped
and counted. Every caption of an example is kept (the trainer draws one per step and row).

Output (``--out``): TFRecord shards ``tokens-SSSSS-of-NNNNN.tfrecord`` (contiguous runs of the
source order), a ``.idx`` sidecar per shard (little-endian int64 record offsets, for random
access), ``dataset.json`` and ``report.json``. One ``tf.train.Example`` per record::

    text_tokens   bytes   k x T int32 little-endian: the k captions, tokenized to config.model.text_len
    image_tokens  bytes   N codes (N = grid * grid, raster order), uint16 (int32 if vocab > 65536)
    num_captions  int64   k
    label         int64   class id (-1 = none)
    key           bytes   the source example's id
    captions      bytes*  the k captions as UTF-8 text

``dataset.json`` has ``format = "dallejax.tokens/1"``, the shard list, ``text_len``, ``grid``,
``image_vocab_size``, ``image_dtype``, the source, split and dVAE path.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

__all__ = ["EncodeError", "encode_dataset"]

_DVAE = _OUT = _SPLIT = _NUM_SHARDS = _BATCH = _MAX_EXAMPLES = _OVERWRITE = None


def _define_flags():
    """Defined when the CLI runs, not at import (absl flags are global; other CLIs share names)."""
    global _DVAE, _OUT, _SPLIT, _NUM_SHARDS, _BATCH, _MAX_EXAMPLES, _OVERWRITE
    _DVAE = flags.DEFINE_string("dvae", None, "dVAE weights: a train_dvae workdir, orbax step dir, .msgpack or "
                                "converted encoder file (default: config.dvae.workdir).")
    _OUT = flags.DEFINE_string("out", None, "Output folder for the token shards.")
    _SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split of config.data to encode.")
    _NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of TFRecord shards.")
    _BATCH = flags.DEFINE_integer("batch", 256, "Images per jitted encoder call.")
    _MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Encode only the first N examples (0 = all).")
    _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing token dataset in --out.")

FORMAT = "dallejax.tokens/1"


class EncodeError(ValueError):
    """A user error: printed as one line by the CLI."""
    user_error = True


def _example(text: np.ndarray, image: np.ndarray, captions, label: int, key: str) -> bytes:
    import tensorflow as tf
    feature = {
        "text_tokens": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.astype("<i4").tobytes()])),
        "image_tokens": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "num_captions": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(captions)])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])),
        "captions": tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode("utf-8") for c in captions])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode_dataset(config, dvae_path: str, out: str, split: str = "train", num_shards: int = 1,
                   batch: int = 256, max_examples: int = 0, overwrite: bool = False) -> dict:
    """Encodes ``config.data``'s ``split`` into token shards in ``out``; returns the report dict."""
    import tensorflow as tf
    from clipjax.data import pipeline
    from clipjax.data.sources import record_size
    from clipjax.train import _Subset
    from dallejax import dvae as dvae_lib
    from dallejax import train_dalle
    from dallejax.train_dvae import to_unit
    from dallejax.transformer import model_from_config

    if not out:
        raise EncodeError("--out is required (the folder the token shards are written to)")
    if num_shards < 1 or batch < 1:
        raise EncodeError(f"--num_shards={num_shards} and --batch={batch} must be >= 1")
    if os.path.exists(os.path.join(out, "dataset.json")) and not overwrite:
        raise EncodeError(f"{out} already holds a dataset (dataset.json); pass --overwrite or another --out")
    if config.data.source == train_dalle.TOKENS_SOURCE:
        raise EncodeError("config.data.source='tokens' is already encoded; set config.data.source to the "
                          "image-caption source (digits, shapes, tfds, shards, manifest)")
    model = model_from_config(config.model)
    cfg = model.config
    dvae = train_dalle.dvae_model(config.get("dvae"))
    if dvae.token_grid != cfg.grid or dvae.vocab_size != cfg.image_vocab_size:
        raise EncodeError(f"config.dvae.model makes a {dvae.token_grid}x{dvae.token_grid} grid of {dvae.vocab_size} "
                          f"codes but config.model has grid={cfg.grid}, image_vocab_size={cfg.image_vocab_size}")
    if int(config.data.image_size) != dvae.image_size:
        raise EncodeError(f"config.data.image_size={config.data.image_size} but the dVAE takes {dvae.image_size} px")
    params = train_dalle.load_dvae_params(dvae_path, config.dvae.get("decoder", "") if "dvae" in config else "",
                                          what="--dvae")
    train_dalle._check_dvae_params(dvae, params, dvae_path, what="--dvae")
    encoder = {"encoder": jax.tree_util.tree_map(jnp.asarray, params["encoder"])}
    encode = jax.jit(lambda p, x: dvae.apply({"params": p}, x, method=dvae_lib.DVAE.encode).reshape(x.shape[0], -1))
    tokenizer = train_dalle._tokenizer(cfg.text_len)
    image_dtype = np.dtype("<u2") if dvae.vocab_size <= 65536 else np.dtype("<i4")

    source = pipeline.make_source(config.data, split)
    subset = _Subset(source, max_examples)
    n = len(subset)
    bs = min(batch, n)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    per_shard = -(-n // num_shards)
    names = [f"tokens-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)]
    counts = np.zeros(num_shards, np.int64)
    positions = np.zeros(num_shards, np.int64)   # byte offset of the next record in each shard
    offsets: list[list[int]] = [[] for _ in range(num_shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(out, name)) for name in names]
    code_counts = np.zeros(dvae.vocab_size, np.int64)
    written, num_captions, nbytes = 0, 0, 0
    labels_seen = False
    it = pipeline.make_eval_iterator(config, batch_size=bs, source=subset)
    try:
        for b in it:
            mask = np.asarray(b["mask"])
            codes = np.asarray(encode(encoder, jnp.asarray(to_unit(b["images"]))))
            for row in np.flatnonzero(mask):
                index = int(b["index"][row])
                ex = subset.get(index)
                caps = [c for c in ex.captions if c.strip()]
                text = tokenizer(caps)
                label = int(b["labels"][row])
                labels_seen |= label >= 0
                record = _example(text, codes[row].astype(image_dtype), caps, label, ex.key or str(index))
                s = min(written // per_shard, num_shards - 1)
                offsets[s].append(int(positions[s]))
                positions[s] += record_size(len(record))
                writers[s].write(record)
                counts[s] += 1
                written += 1
                num_captions += len(caps)
                nbytes += record_size(len(record))
                code_counts += np.bincount(codes[row], minlength=dvae.vocab_size)
    finally:
        for w in writers:
            w.close()
    for s, name in enumerate(names):
        with open(os.path.join(out, name + ".idx"), "wb") as f:
            f.write(np.asarray(offsets[s], "<i8").tobytes())
    seconds = time.perf_counter() - t0
    p = code_counts[code_counts > 0] / max(code_counts.sum(), 1)
    report = {
        "examples": written, "source_examples": n, "skipped": it.skipped, "shards": num_shards,
        "bytes": nbytes, "captions_per_example": num_captions / max(written, 1),
        "code_usage": float(np.mean(code_counts > 0)), "code_perplexity": float(np.exp(-np.sum(p * np.log(p)))),
        "seconds": seconds, "examples_per_sec": written / max(seconds, 1e-9),
    }
    meta = {
        "format": FORMAT, "shards": [{"file": name, "records": int(c)} for name, c in zip(names, counts)],
        "num_examples": written, "text_len": cfg.text_len, "grid": cfg.grid, "image_vocab_size": dvae.vocab_size,
        "image_dtype": image_dtype.name, "text_dtype": "int32", "image_size": dvae.image_size,
        "tokenizer": "clip-bpe", "source": str(config.data.source), "name": str(config.data.get("name", "")),
        "split": split, "dvae": os.path.abspath(dvae_path) if os.path.exists(dvae_path) else dvae_path,
        "classnames": list(getattr(source, "classnames", None) or []) or None, "has_labels": bool(labels_seen),
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _main(config, workdir: str) -> int:
    del workdir
    dvae_path = _DVAE.value or (config.dvae.get("workdir", "") if "dvae" in config else "")
    if not dvae_path:
        raise EncodeError("--dvae is required (a train_dvae workdir or weights file)")
    report = encode_dataset(config, dvae_path, _OUT.value, _SPLIT.value, _NUM_SHARDS.value, _BATCH.value,
                            _MAX_EXAMPLES.value, _OVERWRITE.value)
    skipped = sum(report["skipped"].values())
    print(f"encoded {report['examples']} of {report['source_examples']} examples ({_SPLIT.value}) into "
          f"{report['shards']} shard(s) in {_OUT.value}: {report['bytes'] / 1e6:.2f} MB, "
          f"{report['captions_per_example']:.1f} captions/example, skipped {skipped} {report['skipped'] or ''}")
    print(f"codes: {report['code_usage'] * 100:.1f}% of the code book used, perplexity "
          f"{report['code_perplexity']:.1f}; {report['seconds']:.1f} s ({report['examples_per_sec']:.0f} examples/s)")
    return 0


def main():
    from clipjax.cli import run_main
    _define_flags()
    run_main(_main)


run = main  # console script entry point


if __name__ == "__main__":
    main()
