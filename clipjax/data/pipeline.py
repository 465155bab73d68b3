"""The CLIP input pipeline: indexed source -> tf.data -> host-local numpy batches.

Order and position. A training step is mapped to example indices arithmetically, so any step
can be produced first — resuming at step k reads exactly what step k needs, nothing before it::

    global mode (every host indexes the whole source: built-ins, TFDS, manifests)
        position p = step * global_batch + process_index * local_batch + slot
    local mode  (each host owns a subset of shard files: TFRecord shards)
        position p = step * local_batch + slot            (over this host's records)
    epoch, r = divmod(p, n);   index = permutation(seed, epoch[, host])(r)

The permutation is a keyed Feistel bijection on [0, n) (cycle-walking), so it needs no memory and
no state: a fresh iterator started at step k yields bitwise the batches an iterator started at
0 yields at step k. In global mode the hosts of one step take disjoint slices of the global batch;
in local mode they read disjoint files.

Per example, everything random is keyed by (seed, step, global row): which of several captions is
used (coco: one of 5) and the stateless random-resized-crop seed. A source may refuse an example
(:class:`~clipjax.data.sources.SkipExample`: missing file, corrupt image, empty caption); the
next positions of the same epoch are tried in turn (deterministic, so resume stays exact), and the
skip is counted by reason in :attr:`DataIterator.skipped` for the trainer to log. When
``data.max_retries`` candidates in a row are bad the iterator raises a DataError that says so.

Batches: ``{'images': b h w 3 float32 (CLIP-normalised), 'tokens': b 77 int32}`` plus
``'labels': b int32`` when the source has labels. Eval batches (finite, in order) add
``'mask': b bool`` (False on padding rows, so every host yields the same number of full batches)
and ``'index': b int64`` (the example index; -1 on padding).
"""
from __future__ import annotations

import atexit
import collections
import threading
import weakref
from typing import Any, Iterator, Optional

import ml_collections
import numpy as np

from clipjax.data import sources as src_lib
from clipjax.data.builtin import DigitsSource, ShapesSource
from clipjax.data.sources import DataError, SkipExample, Source

AUTOTUNE = -1


def data_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults for ``config.data``; a config file may set only the keys it needs."""
    c = ml_collections.ConfigDict(dict(
        source="digits",        # digits | shapes | tfds | shards | manifest
        name="",                # tfds: dataset name, e.g. 'coco_captions' or 'cifar10'
        split="train",          # tfds / built-ins: training split
        eval_split="test",      # tfds / built-ins: evaluation split
        path="",                # shards: folder or glob; manifest: .csv/.jsonl or image folder
        eval_path="",           # the same for evaluation
        data_dir="",            # tfds data_dir ('' = TFDS default)
        image_key="image",      # tfds feature paths ('/' for nested features)
        caption_key="",         # e.g. 'captions/text' (coco_captions); '' = prompts from labels
        label_key="",           # e.g. 'label'
        image_size=224,         # model input resolution
        builtin_size=0,         # digits/shapes stored resolution (0 = image_size)
        shapes_num_train=8640, shapes_num_test=1728,
        crop_scale=(0.9, 1.0),  # random-resized-crop area range for training
        train_resize="fast",    # fast: one antialiased TF bicubic pass; pil: clipjax.preprocess's
                                # PIL-exact two-pass 8-bit resize (same crop box, slower)
        context_length=77,
        num_parallel_calls=AUTOTUNE,
        prefetch=2,             # batches
        max_retries=16,         # consecutive bad examples tolerated before a DataError
        eval_batch_size=0,      # 0 = config.batch_size
    ))
    c.update(overrides)
    return c


def _cfg(data_cfg, key):
    defaults = data_config()
    return data_cfg.get(key, defaults[key]) if data_cfg is not None else defaults[key]


def make_source(data_cfg, which: str = "train") -> Source:
    """The source ``config.data`` describes, for 'train' or 'eval'."""
    if which not in ("train", "eval"):
        raise ValueError(f"which={which!r}: use 'train' or 'eval'")
    kind = _cfg(data_cfg, "source")
    split = _cfg(data_cfg, "split" if which == "train" else "eval_split")
    size = int(_cfg(data_cfg, "builtin_size") or _cfg(data_cfg, "image_size"))
    if kind == "digits":
        return DigitsSource(split, image_size=size)
    if kind == "shapes":
        return ShapesSource(split, image_size=size, num_train=int(_cfg(data_cfg, "shapes_num_train")),
                            num_test=int(_cfg(data_cfg, "shapes_num_test")))
    if kind == "tfds":
        if not _cfg(data_cfg, "name"):
            raise DataError("config.data.source='tfds' needs config.data.name (e.g. 'coco_captions')")
        return src_lib.TFDSSource(_cfg(data_cfg, "name"), split, _cfg(data_cfg, "data_dir") or None,
                                  _cfg(data_cfg, "image_key"), _cfg(data_cfg, "caption_key"),
                                  _cfg(data_cfg, "label_key"))
    if kind in ("shards", "manifest"):
        key = "path" if which == "train" else "eval_path"
        path = _cfg(data_cfg, key)
        if not path:
            raise DataError(f"config.data.source={kind!r} needs config.data.{key}")
        return src_lib.ShardsSource(path) if kind == "shards" else src_lib.ManifestSource(path)
    raise DataError(f"config.data.source={kind!r}: use digits, shapes, tfds, shards or manifest")


def has_labels(source: Source) -> bool:
    if getattr(source, "has_labels", None) is not None:
        return bool(source.has_labels)
    labels = getattr(source, "labels", None)
    if labels is not None:
        return bool(np.any(np.asarray(labels) >= 0))
    return getattr(source, "classnames", None) is not None


# ---------------------------------------------------------------------------------------------
# order

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, k: np.uint64) -> np.ndarray:
    x = (x ^ k) * _M1
    x ^= x >> np.uint64(31)
    x = x * _M2
    return x ^ (x >> np.uint64(29))


def permute(positions, n: int, key) -> np.ndarray:
    """A keyed bijection of [0, n), applied to ``positions`` (4-round Feistel, cycle-walking).

    ``key`` is any sequence of non-negative ints (e.g. (seed, epoch)). Costs O(1) memory for any
    n, unlike materialising ``rng.permutation(n)`` per epoch.
    """
    x = np.atleast_1d(np.asarray(positions, np.uint64))
    if n <= 1:
        return np.zeros(x.shape, np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence([int(k) for k in key]).generate_state(4, np.uint64)

    def feistel(v):
        left, right = v >> half, v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << half) | right

    y = feistel(x)
    bad = y >= np.uint64(n)
    while bad.any():  # cycle-walk back into [0, n): at most a few rounds (domain < 4n)
        y[bad] = feistel(y[bad])
        bad = y >= np.uint64(n)
    return y.astype(np.int64)


class Stats:
    """Skip counts shared by the tf.data threads; read them through DataIterator."""

    def __init__(self):
        self._lock = threading.Lock()
        self.skipped: collections.Counter = collections.Counter()  # reason -> skips
        self.bad_indices: dict = {}  # index -> reason, so a known-bad example is not re-read
        self.examples = 0
        self.error: Optional[Exception] = None

    def skip(self, reason: str, index: int):
        with self._lock:
            self.skipped[reason] += 1
            self.bad_indices[int(index)] = reason

    def count(self):
        with self._lock:
            self.examples += 1

    def as_dict(self) -> dict:
        with self._lock:
            return {"examples": self.examples, "skipped_total": int(sum(self.skipped.values())),
                    "skipped_unique": len(self.bad_indices), "skipped": dict(self.skipped)}


def _as_rgb(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise DataError(f"source returned a {a.dtype} image; sources must give uint8 h w 3 arrays")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise DataError(f"source returned an image of shape {a.shape}; expected h w 3")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)


class _Fetcher:
    """Python side of the pipeline: (step, slot) -> one example, run inside tf.numpy_function."""

    def __init__(self, source: Source, seed: int, global_batch: int, local_batch: int,
                 process_index: int, mode: str, max_retries: int, stats: Stats):
        self.source, self.seed, self.mode = source, int(seed), mode
        self.global_batch, self.local_batch, self.pi = global_batch, local_batch, process_index
        self.n, self.max_retries, self.stats = len(source), max_retries, stats
        if self.n == 0:
            raise DataError(f"source {getattr(source, 'name', source)!r} has no examples")
        self._pad_png = None

    def position(self, step: int, slot: int) -> int:
        if self.mode == "global":
            return step * self.global_batch + self.pi * self.local_batch + slot
        return step * self.local_batch + slot

    def index_at(self, p: int, retry: int = 0) -> int:
        epoch, r = divmod(p, self.n)
        key = (self.seed, epoch) if self.mode == "global" else (self.seed, epoch, self.pi, 1)
        return int(permute([(r + retry) % self.n], self.n, key)[0])

    def _load(self, index: int):
        known = self.stats.bad_indices.get(index)
        if known is not None:
            self.stats.skip(known, index)
            return None
        try:
            ex = self.source.get(index)
        except SkipExample as e:
            self.stats.skip(e.reason, index)
            return None
        if not ex.captions:
            self.stats.skip("empty_caption", index)
            return None
        return ex

    def _image_out(self, ex):
        if self.source.kind == "encoded":
            return np.asarray(ex.image, dtype=object)
        return _as_rgb(ex.image)

    def train(self, step, slot):
        try:
            step, slot = int(step), int(slot)
            p = self.position(step, slot)
            row = self.pi * self.local_batch + slot
            for retry in range(self.max_retries):
                index = self.index_at(p, retry)
                ex = self._load(index)
                if ex is not None:
                    break
                if len(self.stats.bad_indices) >= self.n:
                    raise DataError(
                        f"none of the {self.n} examples of {getattr(self.source, 'name', '')!r} is "
                        f"usable (skipped: {dict(self.stats.skipped)}); check the data, e.g. with "
                        f"python -m clipjax.data.shards, which reports every bad row")
            else:
                raise DataError(
                    f"{self.max_retries} consecutive examples of {getattr(self.source, 'name', '')!r} "
                    f"were unusable (step {step}, slot {slot}; skipped so far: "
                    f"{dict(self.stats.skipped)}). Fix or drop the bad rows (python -m "
                    f"clipjax.data.shards validates them and writes a report), or raise "
                    f"config.data.max_retries")
            self.stats.count()
            ss = np.random.SeedSequence([self.seed, 0xC11F, step, row])
            choice, s0, s1 = ss.generate_state(3, np.uint32)
            caption = ex.captions[int(choice) % len(ex.captions)]
            return (self._image_out(ex), np.asarray(caption.encode("utf-8"), dtype=object),
                    np.int32(ex.label), np.int64(index),
                    np.array([s0 >> 1, s1 >> 1], np.int64))
        except Exception as e:  # keep the real error for DataIterator to re-raise
            if self.stats.error is None:
                self.stats.error = e
            raise

    def eval(self, index, caption_index):
        try:
            index = int(index)
            if index >= 0:
                ex = self._load(index)
                if ex is not None:
                    self.stats.count()
                    caption = ex.captions[min(int(caption_index), len(ex.captions) - 1)]
                    return (self._image_out(ex), np.asarray(caption.encode("utf-8"), dtype=object),
                            np.int32(ex.label), np.bool_(True))
            # padding row or unusable example: masked out
            if self.source.kind == "encoded":
                image = np.asarray(self._pad_image_bytes(), dtype=object)
            else:
                image = np.zeros((8, 8, 3), np.uint8)
            return image, np.asarray(b"", dtype=object), np.int32(src_lib.NO_LABEL), np.bool_(False)
        except Exception as e:
            if self.stats.error is None:
                self.stats.error = e
            raise

    def _pad_image_bytes(self) -> bytes:
        if self._pad_png is None:
            import io
            from PIL import Image
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format="PNG")
            self._pad_png = buf.getvalue()
        return self._pad_png


# ---------------------------------------------------------------------------------------------
# tf.data

_LIVE_ITERATORS: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
    # A tf.data iterator still holding prefetched batches when the interpreter shuts down can
    # deadlock the exit (its worker threads wait on Python callbacks: tf.numpy_function).
    # Releasing them before the interpreter finalises lets a script that never exhausted or
    # closed its iterators exit normally.
    for it in list(_LIVE_ITERATORS):
        it.close()


class DataIterator:
    """Iterator of host-local numpy batches; ``skipped`` / ``stats()`` expose the skip counts.
    ``close()`` (or ``with``) releases the tf.data iterator and its prefetch threads."""

    def __init__(self, dataset, stats: Stats, source: Source, mode: str, num_batches: Optional[int] = None):
        self.dataset, self.source, self.mode, self.num_batches = dataset, source, mode, num_batches
        self._stats = stats
        self._it = iter(dataset.as_numpy_iterator())
        _LIVE_ITERATORS.add(self)

    def close(self) -> None:
        self._it = iter(())
        _LIVE_ITERATORS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import tensorflow as tf
        try:
            return next(self._it)
        except tf.errors.OpError as e:
            if self._stats.error is not None:
                raise self._stats.error from None
            raise DataError(
                f"the input pipeline failed: {e.message.strip()[:500]}. Shards written by "
                f"python -m clipjax.data.shards are validated; for other data, convert it with that "
                f"CLI (bad images are skipped and reported) or use data.source='manifest'") from None

    def __len__(self):
        if self.num_batches is None:
            raise TypeError("the training iterator is infinite")
        return self.num_batches

    @property
    def skipped(self) -> dict:
        """Skips so far by reason (a bad example met again in a later epoch counts again)."""
        return dict(self._stats.skipped)

    def stats(self) -> dict:
        return self._stats.as_dict()


def _tokenize_fn(context_length: int):
    from clipjax.tokenizer import Tokenizer
    tok = Tokenizer(context_length=context_length)

    def fn(captions):
        return tok([c.decode("utf-8") for c in captions.tolist()]).astype(np.int32)
    return fn


def _decode(image, kind: str):
    import tensorflow as tf
    if kind == "encoded":
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _finish(ds, local_batch: int, context_length: int, with_labels: bool, prefetch: int,
            extra_keys=()):
    """batch -> tokenize the batch's captions -> output dict -> prefetch."""
    import tensorflow as tf
    ds = ds.batch(local_batch, drop_remainder=True)
    tokenize = _tokenize_fn(context_length)

    def to_batch(ex):
        tokens = tf.numpy_function(tokenize, [ex["caption"]], tf.int32, stateful=False)
        tokens.set_shape([local_batch, context_length])
        out = {"images": ex["image"], "tokens": tokens}
        if with_labels:
            out["labels"] = ex["label"]
        for k in extra_keys:
            out[k] = ex[k]
        return out
    ds = ds.map(to_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(prefetch if prefetch > 0 else tf.data.AUTOTUNE)


def _options():
    import tensorflow as tf
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    return opts


def make_train_iterator(config, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                        source: Optional[Source] = None) -> DataIterator:
    """Infinite iterator of host-local training batches for steps start_step, start_step+1, ...

    Each batch has ``config.batch_size // process_count`` rows and is a pure function of
    (config.seed, step, process_index): see the module docstring for how the position is found.
    """
    import tensorflow as tf
    from clipjax import preprocess
    data_cfg = config.get("data") if hasattr(config, "get") else None
    if config.batch_size % process_count:
        raise DataError(f"config.batch_size={config.batch_size} is not divisible by the "
                        f"{process_count} processes")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is outside [0, {process_count})")
    global_batch = int(config.batch_size)
    local_batch = global_batch // process_count
    source = source if source is not None else make_source(data_cfg, "train")
    host_source, mode = source.for_process(process_index, process_count)
    stats = Stats()
    fetcher = _Fetcher(host_source, int(config.seed), global_batch, local_batch, process_index, mode,
                       int(_cfg(data_cfg, "max_retries")), stats)
    size = int(_cfg(data_cfg, "image_size"))
    scale = tuple(float(s) for s in _cfg(data_cfg, "crop_scale"))
    kind = host_source.kind
    image_dtype = tf.string if kind == "encoded" else tf.uint8
    resize = _cfg(data_cfg, "train_resize")
    if resize not in ("fast", "pil"):
        raise DataError(f"config.data.train_resize={resize!r}: use 'fast' or 'pil'")

    def load(element):
        step, slot = element // local_batch, element % local_batch
        image, caption, label, index, seed = tf.numpy_function(
            fetcher.train, [step, slot], [image_dtype, tf.string, tf.int32, tf.int64, tf.int64],
            stateful=False)
        image = _decode(image, kind)
        seed.set_shape([2])
        if resize == "pil":
            image = preprocess.tf_random_resized_crop(image, size, scale=scale, seed=seed)
        else:
            image = _fast_random_resized_crop(image, size, scale, seed)
        image = tf.ensure_shape(tf.cast(image, tf.float32), [size, size, 3])
        caption.set_shape([])
        label.set_shape([])
        return {"image": image, "caption": caption, "label": label}

    start = int(start_step) * local_batch
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    ds = ds.map(load, num_parallel_calls=int(_cfg(data_cfg, "num_parallel_calls")), deterministic=True)
    ds = _finish(ds, local_batch, int(_cfg(data_cfg, "context_length")), has_labels(source),
                 int(_cfg(data_cfg, "prefetch")))
    return DataIterator(ds.with_options(_options()), stats, host_source, mode)


def _fast_random_resized_crop(image, size: int, scale, seed):
    """The same crop box as clipjax.preprocess.tf_random_resized_crop (torchvision's sampling,
    stateless in ``seed``), resized with ONE antialiased TF bicubic pass in float. The 'pil'
    variant reproduces PIL's two 8-bit passes exactly, which costs ~2 extra full-image passes;
    training augmentation need not match PIL to the grey level (eval does, and uses it)."""
    import tensorflow as tf
    from clipjax import preprocess
    shape = tf.shape(image)
    top, left, ch, cw = preprocess.tf_random_resized_crop_box(shape[0], shape[1], seed, scale)
    crop = tf.cast(tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, 3])), tf.float32)
    out = tf.image.resize(crop, [size, size], method="bicubic", antialias=True)
    out = tf.clip_by_value(out, 0.0, 255.0) / 255.0
    mean = tf.constant(preprocess.CLIP_MEAN, tf.float32)
    std = tf.constant(preprocess.CLIP_STD, tf.float32)
    return (out - mean) / std


def make_data_fn(config):
    """``Task.data`` for the trainer: (start_step, process_index, process_count) -> iterator."""
    def data(start_step: int, process_index: int, process_count: int):
        return make_train_iterator(config, start_step, process_index, process_count)
    return data


def make_eval_iterator(config, batch_size: Optional[int] = None, process_index: int = 0,
                       process_count: int = 1, source: Optional[Source] = None,
                       caption_index: int = 0) -> DataIterator:
    """Finite, in-order iterator over the eval source (CLIP eval transform, first caption).

    Host ``h`` of ``P`` gets examples h, h+P, h+2P, ...; every host yields the same number of
    full batches (``len(iterator)``), padding rows have ``mask`` False and ``index`` -1.
    Unusable examples (SkipExample) are masked out and counted in ``skipped``.
    """
    import tensorflow as tf
    from clipjax import preprocess
    data_cfg = config.get("data") if hasattr(config, "get") else None
    batch_size = int(batch_size or _cfg(data_cfg, "eval_batch_size") or config.batch_size)
    source = source if source is not None else make_source(data_cfg, "eval")
    n = len(source)
    per_host = -(-n // process_count)
    num_batches = -(-per_host // batch_size)
    indices = np.arange(process_index, n, process_count, dtype=np.int64)
    indices = np.concatenate([indices, np.full(num_batches * batch_size - len(indices), -1, np.int64)])
    stats = Stats()
    fetcher = _Fetcher(source, int(getattr(config, "seed", 0)), batch_size, batch_size, process_index,
                       "global", 1, stats)
    size = int(_cfg(data_cfg, "image_size"))
    kind = source.kind
    image_dtype = tf.string if kind == "encoded" else tf.uint8

    def load(index):
        image, caption, label, mask = tf.numpy_function(
            fetcher.eval, [index, caption_index], [image_dtype, tf.string, tf.int32, tf.bool],
            stateful=False)
        image = _decode(image, kind)
        image = preprocess.tf_preprocess_eval(image, size)
        image = tf.ensure_shape(tf.cast(image, tf.float32), [size, size, 3])
        for t in (caption, label, mask):
            t.set_shape([])
        return {"image": image, "caption": caption, "label": label, "mask": mask, "index": index}

    ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.map(load, num_parallel_calls=int(_cfg(data_cfg, "num_parallel_calls")), deterministic=True)
    ds = _finish(ds, batch_size, int(_cfg(data_cfg, "context_length")), True,
                 int(_cfg(data_cfg, "prefetch")), extra_keys=("mask", "index"))
    return DataIterator(ds.with_options(_options()), stats, source, "global", num_batches)
