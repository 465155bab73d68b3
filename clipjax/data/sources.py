"""Indexed (random-access) example sources, image/caption validation, and our shard format.

Every source is *indexed*: ``len(source)`` examples and ``source.get(i) -> Example``, a pure
function of ``i``. The pipeline (:mod:`clipjax.data.pipeline`) maps a training step to indices
with a per-epoch permutation, so any step can be produced directly, without replaying the stream.

Sources:
  * built-ins — :class:`~clipjax.data.builtin.DigitsSource`, :class:`~clipjax.data.builtin.ShapesSource`
  * :class:`TFDSSource` — any TFDS dataset through ``tfds.data_source`` (random access over
    ArrayRecord files), with a feature mapping (image key, caption key, label key)
  * :class:`ShardsSource` — TFRecord shards written by ``python -m clipjax.data.shards``
  * :class:`ManifestSource` — a CSV/JSONL manifest (path, caption) or a folder of images with
    sidecar ``.txt`` captions, read directly; bad rows are skipped (and counted) at read time

A source may raise :class:`SkipExample` from ``get`` (missing file, corrupt image, empty caption,
...); the pipeline then substitutes another example deterministically and counts the reason.

Shard format (one ``tf.train.Example`` per record)::

    image    bytes   encoded JPEG or PNG, always decodable to RGB by tf.io.decode_image
    caption  bytes*  one or more UTF-8 captions (one is drawn per step when there are several)
    key      bytes   the source row's id (relative path or manifest key)
    label    int64   optional class id (-1 = none)
    attrs    bytes   optional JSON object of extra attributes

Next to ``NAME.tfrecord`` the writer puts ``NAME.tfrecord.idx`` (little-endian int64 byte offsets
of the records) and ``dataset.json`` (files and record counts). Without the ``.idx`` files the
reader finds the offsets by scanning the 12-byte record headers once.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import struct
import threading
from typing import Any, Iterable, Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_CAPTION_CHARS = 1000        # longer captions are truncated (77 tokens is ~300 characters)
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused (decompression-bomb guard)
NO_LABEL = -1


class DataError(ValueError):
    """The data cannot be used as given. The message names the problem and the fix.
    CLIs print it as one line (exit 2), not a traceback."""
    user_error = True


class SkipExample(Exception):
    """This example is unusable; ``reason`` is a short snake_case key used in skip counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Example:
    """One raw example.

    image: ``h w 3`` uint8 array (sources of kind 'array') or encoded bytes (kind 'encoded').
    captions: one or more captions; training draws one per step, evaluation takes the first.
    """
    image: Any
    captions: Sequence[str]
    label: int = NO_LABEL
    key: str = ""


class Source:
    """Base class: ``len(source)``, ``source.get(index) -> Example``.

    Attributes: ``kind`` ('array' | 'encoded'), ``name``, ``classnames`` (list or None).
    """
    kind = "array"
    name = "source"
    classnames: Optional[list] = None
    has_labels: Optional[bool] = None  # None: decided from ``labels`` / ``classnames``

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> Example:
        raise NotImplementedError

    def captions(self, index: int) -> list[str]:
        """All captions of example ``index`` (for retrieval evaluation)."""
        return list(self.get(index).captions)

    def for_process(self, process_index: int, process_count: int) -> tuple["Source", str]:
        """(source this host reads, mode). 'global': every host indexes the whole source and the
        pipeline slices each global batch; 'local': this host owns the returned subset."""
        return self, "global"


# ---------------------------------------------------------------------------------------------
# validation shared by the shards CLI and ManifestSource

def read_caption(raw: bytes | str | None) -> tuple[str, bool]:
    """Validates a caption. Returns (caption, truncated); raises SkipExample when unusable."""
    if raw is None:
        raise SkipExample("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipExample("caption_not_utf8", str(e))
    text = raw.lstrip("\ufeff").strip()
    if not text:
        raise SkipExample("empty_caption")
    if len(text) > MAX_CAPTION_CHARS:
        return text[:MAX_CAPTION_CHARS], True
    return text, False


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = 0):
    """Decodes ``data`` fully with PIL and converts it to 8-bit RGB.

    Returns (PIL RGB image, conversions, original format). ``conversions`` lists what was done:
    'cmyk', 'alpha' (composited on white), 'palette', 'grey', '16bit', 'exif_rotated',
    'resized' (shorter side down to ``max_side`` when > 0), 'other_mode'.
    Raises SkipExample('empty_file' | 'corrupt_image' | 'image_too_large').
    """
    from PIL import Image, ImageOps
    if not data:
        raise SkipExample("empty_file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        w, h = img.size
        if w * h > max_pixels:
            raise SkipExample("image_too_large", f"{w}x{h} > {max_pixels} pixels")
        img.load()
    except SkipExample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipExample("image_too_large", str(e))
    except Exception as e:  # truncated, corrupt, unknown format: PIL raises many kinds
        raise SkipExample("corrupt_image", f"{type(e).__name__}: {e}")
    conversions = []
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if _orientation(img) not in (None, 1):
            img = ImageOps.exif_transpose(img)
            conversions.append("exif_rotated")
        img, mode_notes = _to_rgb(img)
        conversions += mode_notes
        if max_side and min(img.size) > max_side:
            scale = max_side / min(img.size)
            img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                             Image.BICUBIC)
            conversions.append("resized")
    except Exception as e:
        raise SkipExample("corrupt_image", f"{type(e).__name__}: {e}")
    return img, conversions, fmt


def _orientation(img) -> Optional[int]:
    try:
        return img.getexif().get(0x0112)
    except Exception:
        return None


def _to_rgb(img):
    from PIL import Image
    mode = img.mode
    if mode == "RGB":
        return img, []
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), ["16bit"]
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return img, ["palette"]
        mode, notes = "RGBA", ["palette"]
    else:
        notes = []
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes + ["alpha"]
    if mode == "CMYK":
        return img.convert("RGB"), ["cmyk"]
    if mode in ("L", "1"):
        return img.convert("RGB"), ["grey"]
    return img.convert("RGB"), ["other_mode"]


def encode_for_shard(img, conversions: list, original: bytes, fmt: Optional[str],
                     reencode: str = "auto", quality: int = 95) -> bytes:
    """Keeps the original bytes when they already decode to the same RGB in TF (plain RGB/grey
    JPEG or RGB PNG, nothing converted); otherwise re-encodes ``img``: 'auto' keeps lossy
    sources lossy (JPEG) and lossless ones lossless (PNG), or force 'jpeg' / 'png'."""
    if not conversions and fmt in ("JPEG", "PNG"):
        return original
    if conversions == ["grey"] and fmt == "JPEG":
        return original  # tf.io.decode_image(channels=3) expands grey JPEGs itself
    if reencode == "auto":
        reencode = "jpeg" if fmt in ("JPEG", "MPO", "WEBP") else "png"
    buf = io.BytesIO()
    if reencode == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# rows of a folder or manifest

@dataclasses.dataclass
class Row:
    """A manifest row. ``caption`` is raw (bytes or str; None = missing)."""
    path: str
    caption: Any
    key: str
    label: int = NO_LABEL
    attrs: Optional[dict] = None


_PATH_COLUMNS = ("image", "path", "file", "filepath", "filename", "image_path", "url")
_CAPTION_COLUMNS = ("caption", "text", "captions", "title")


def list_rows(input_path: str) -> list[Row]:
    """Rows of a folder (images + sidecar .txt), a .csv or a .jsonl/.json manifest.

    Manifest columns: a path (one of image/path/file/filepath/filename/image_path) and a
    caption (caption/text/captions/title); optional ``label`` (int) and ``key``. Relative paths
    are taken relative to the manifest's folder. Folder captions are read as bytes so that
    non-UTF-8 files are reported rather than crashing.
    """
    if os.path.isdir(input_path):
        return _folder_rows(input_path)
    if not os.path.exists(input_path):
        raise DataError(f"{input_path}: no such file or folder; pass a folder of images with "
                        f"sidecar .txt captions, or a .csv / .jsonl manifest")
    ext = os.path.splitext(input_path)[1].lower()
    base = os.path.dirname(os.path.abspath(input_path))
    if ext == ".csv":
        with open(input_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = list(csv.DictReader(f))
    elif ext in (".jsonl", ".json"):
        records = []
        with open(input_path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    records.append({"__error__": f"line {n}: {e}"})
    else:
        raise DataError(f"{input_path}: unknown manifest type {ext!r}; use .csv or .jsonl "
                        f"(or pass a folder of images with sidecar .txt captions)")
    rows = []
    for i, rec in enumerate(records):
        if "__error__" in rec:
            rows.append(Row(path="", caption=None, key=f"row{i}", attrs={"__error__": rec["__error__"]}))
            continue
        pcol = next((c for c in _PATH_COLUMNS if c in rec), None)
        ccol = next((c for c in _CAPTION_COLUMNS if c in rec), None)
        if pcol is None or ccol is None:
            raise DataError(f"{input_path}: row {i} has columns {sorted(rec)}; need a path column "
                            f"({'/'.join(_PATH_COLUMNS[:6])}) and a caption column "
                            f"({'/'.join(_CAPTION_COLUMNS)})")
        path = str(rec[pcol])
        caption = rec[ccol]
        if isinstance(caption, str):
            # csv read with surrogateescape: undecodable bytes come back as lone surrogates
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError:
                caption = caption.encode("utf-8", "surrogateescape")
        label = rec.get("label", NO_LABEL)
        try:
            label = int(label) if label not in (None, "") else NO_LABEL
        except (TypeError, ValueError):
            label = NO_LABEL
        rows.append(Row(path=path if os.path.isabs(path) else os.path.join(base, path),
                        caption=caption, key=str(rec.get("key", path)), label=label))
    return rows


def _folder_rows(folder: str) -> list[Row]:
    rows = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, name)
            txt = os.path.join(root, stem + ".txt")
            caption = None
            if os.path.exists(txt):
                with open(txt, "rb") as f:
                    caption = f.read()
            rows.append(Row(path=path, caption=caption, key=os.path.relpath(path, folder)))
    return rows


def _multi_captions(caption) -> list:
    """A JSON list of captions in a manifest -> several captions for one image."""
    if isinstance(caption, (list, tuple)):
        return list(caption)
    return [caption]


class ManifestSource(Source):
    """A CSV/JSONL manifest or a folder of images + sidecar .txt, read directly (no shards).

    Each ``get`` reads and validates the file with PIL (same checks as the shards CLI) and
    raises :class:`SkipExample` for bad rows; the pipeline substitutes and counts them. For
    throughput on large data, convert once with ``python -m clipjax.data.shards`` instead.
    """
    kind = "array"

    def __init__(self, path: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path, self.max_pixels = path, max_pixels
        self.rows = list_rows(path)
        if not self.rows:
            raise DataError(f"{path}: no rows (no images with a known extension "
                            f"{IMAGE_EXTENSIONS} or an empty manifest)")
        self.name = os.path.basename(os.path.normpath(path))
        labels = [r.label for r in self.rows]
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, index: int) -> Example:
        row = self.rows[index]
        if row.attrs and "__error__" in row.attrs:
            raise SkipExample("bad_manifest_row", row.attrs["__error__"])
        captions = [read_caption(c)[0] for c in _multi_captions(row.caption)]
        try:
            with open(row.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SkipExample("missing_file", row.path)
        except OSError as e:
            raise SkipExample("unreadable_file", f"{row.path}: {e}")
        img, _, _ = load_image(data, self.max_pixels)
        return Example(image=np.asarray(img, np.uint8), captions=captions, label=row.label, key=row.key)


# ---------------------------------------------------------------------------------------------
# TFRecord shards

def make_tf_example(image: bytes, captions: Sequence[str], key: str = "", label: int = NO_LABEL,
                    attrs: Optional[dict] = None) -> bytes:
    """Serialises one record of our shard format."""
    import tensorflow as tf
    feats = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode("utf-8") for c in captions])),
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("utf-8", "replace")])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    if attrs:
        feats["attrs"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[json.dumps(attrs).encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def parse_tf_example(record: bytes) -> tuple[bytes, list[str], str, int, Optional[dict]]:
    """Inverse of :func:`make_tf_example`: (image bytes, captions, key, label, attrs)."""
    from tensorflow.core.example import example_pb2
    ex = example_pb2.Example.FromString(record)
    f = ex.features.feature
    image = f["image"].bytes_list.value[0] if "image" in f and f["image"].bytes_list.value else b""
    caps = [c.decode("utf-8", "replace") for c in f["caption"].bytes_list.value] if "caption" in f else []
    key = f["key"].bytes_list.value[0].decode("utf-8", "replace") if "key" in f and f["key"].bytes_list.value else ""
    label = int(f["label"].int64_list.value[0]) if "label" in f and f["label"].int64_list.value else NO_LABEL
    attrs = json.loads(f["attrs"].bytes_list.value[0]) if "attrs" in f and f["attrs"].bytes_list.value else None
    return image, caps, key, label, attrs


def record_size(payload_len: int) -> int:
    """Bytes one TFRecord occupies: length (8) + crc (4) + payload + crc (4)."""
    return payload_len + 16


def scan_offsets(path: str) -> np.ndarray:
    """Byte offsets of every record of an (uncompressed) TFRecord file, from its headers."""
    import tensorflow as tf
    offsets = []
    with tf.io.gfile.GFile(path, "rb") as f:
        size = f.size()
        pos = 0
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                raise DataError(f"{path}: truncated record header at byte {pos}; re-create the "
                                f"shard with python -m clipjax.data.shards")
            (length,) = struct.unpack("<Q", header)
            offsets.append(pos)
            pos += record_size(length)
        if pos != size:
            raise DataError(f"{path}: last record runs past the end of the file (truncated copy?)")
    return np.asarray(offsets, np.int64)


def _glob_shards(path: str) -> list[str]:
    import tensorflow as tf
    if tf.io.gfile.isdir(path):
        meta = os.path.join(path, "dataset.json")
        if tf.io.gfile.exists(meta):
            with tf.io.gfile.GFile(meta) as f:
                info = json.load(f)
            return [os.path.join(path, s["file"]) for s in info["shards"]]
        files = sorted(tf.io.gfile.glob(os.path.join(path, "*.tfrecord*")))
        files = [f for f in files if not f.endswith(".idx")]
    else:
        files = sorted(f for f in tf.io.gfile.glob(path) if not f.endswith(".idx"))
    if not files:
        raise DataError(f"{path}: no TFRecord shards found (expected *.tfrecord files or a "
                        f"dataset.json); create them with python -m clipjax.data.shards")
    return files


class ShardsSource(Source):
    """Random access over TFRecord shards of our format (``python -m clipjax.data.shards``).

    Each record is read by its byte offset (``.idx`` sidecar, or scanned once), so example ``i``
    costs one positioned read. ``for_process`` gives host ``h`` of ``P`` the shards ``h::P``
    ('local' mode): hosts read disjoint files, and each host's position is restored from the
    step alone (pipeline: host-local position = step * local_batch + slot -> epoch + index in a
    per-(seed, epoch, host) permutation -> (shard, byte offset)).
    """
    kind = "encoded"

    def __init__(self, path_or_files, classnames: Optional[list] = None, has_labels: bool = False):
        import tensorflow as tf
        self.files = _glob_shards(path_or_files) if isinstance(path_or_files, str) else list(path_or_files)
        self.name = os.path.basename(os.path.normpath(path_or_files)) if isinstance(path_or_files, str) else "shards"
        self.classnames, self.has_labels = classnames, has_labels
        if isinstance(path_or_files, str) and tf.io.gfile.isdir(path_or_files):
            meta = os.path.join(path_or_files, "dataset.json")
            if tf.io.gfile.exists(meta):
                with tf.io.gfile.GFile(meta) as f:
                    info = json.load(f)
                self.classnames = self.classnames or info.get("classnames")
                self.has_labels = bool(info.get("has_labels", False))
        self.offsets = []
        for fname in self.files:
            idx = fname + ".idx"
            if tf.io.gfile.exists(idx):
                with tf.io.gfile.GFile(idx, "rb") as f:
                    self.offsets.append(np.frombuffer(f.read(), "<i8").astype(np.int64))
            else:
                self.offsets.append(scan_offsets(fname))
        counts = np.array([len(o) for o in self.offsets], np.int64)
        self.cum = np.concatenate([[0], np.cumsum(counts)])
        self._local = threading.local()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local"), state.pop("_fds"), state.pop("_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local, self._fds, self._lock = threading.local(), {}, threading.Lock()

    def for_process(self, process_index: int, process_count: int):
        if process_count == 1:
            return self, "local"
        if len(self.files) < process_count:
            raise DataError(f"{len(self.files)} shard files for {process_count} processes: each host "
                            f"reads its own shards, so re-create them with "
                            f"--num_shards a multiple of {process_count}")
        sub = ShardsSource(self.files[process_index::process_count], self.classnames, self.has_labels)
        sub.name = self.name
        return sub, "local"

    def read_record(self, index: int) -> bytes:
        s = int(np.searchsorted(self.cum, index, side="right") - 1)
        fname, off = self.files[s], int(self.offsets[s][index - self.cum[s]])
        if "://" not in fname:
            fd = self._fds.get(fname)
            if fd is None:
                with self._lock:
                    fd = self._fds.get(fname)
                    if fd is None:
                        fd = self._fds[fname] = os.open(fname, os.O_RDONLY)
            (length,) = struct.unpack("<Q", os.pread(fd, 8, off))
            data = os.pread(fd, length, off + 12)
        else:
            import tensorflow as tf
            with tf.io.gfile.GFile(fname, "rb") as f:
                f.seek(off)
                (length,) = struct.unpack("<Q", f.read(8))
                f.seek(off + 12)
                data = f.read(length)
        if len(data) != length:
            raise DataError(f"{fname}: record at byte {off} is truncated; re-create the shards")
        return data

    def get(self, index: int) -> Example:
        image, caps, key, label, _ = parse_tf_example(self.read_record(index))
        if not image:
            raise SkipExample("empty_file", key)
        if not caps or not any(c.strip() for c in caps):
            raise SkipExample("empty_caption", key)
        return Example(image=image, captions=[c for c in caps if c.strip()], label=label, key=key)

    def attrs(self, index: int) -> Optional[dict]:
        return parse_tf_example(self.read_record(index))[4]

    def __del__(self, _close=os.close):  # os may be gone at interpreter exit
        for fd in getattr(self, "_fds", {}).values():
            try:
                _close(fd)
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------
# TFDS

def _get_path(example: dict, path: str):
    value = example
    for part in path.split("/") if path else []:
        if not isinstance(value, dict) or part not in value:
            # TFDS also flattens names with '/', e.g. 'image/id'
            if isinstance(example, dict) and path in example:
                return example[path]
            raise KeyError(part)
        value = value[part]
    return value


def _as_texts(value) -> list[str]:
    if isinstance(value, (bytes, str)):
        value = [value]
    out = []
    for v in np.asarray(value, dtype=object).reshape(-1):
        out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return out


class TFDSSource(Source):
    """A TFDS dataset with random access (``tfds.data_source``, ArrayRecord files).

    Args:
      name: TFDS name, optionally with config/version ("coco_captions", "cifar10:3.0.2").
      split: TFDS split string ("train", "test", "train[:90%]").
      image_key: feature path of the image ('image').
      caption_key: feature path of the caption(s), '/'-separated for nested features
        (coco_captions: 'captions/text', five per image; one is drawn per step from
        (seed, step, index)). Empty: captions come from class names and prompt templates.
      label_key: feature path of an integer class label ('label'), or ''.
      classnames / templates: override the names (default: clipjax.evals.classnames for known
        datasets, else the TFDS label names) and the templates (default: that dataset's
        templates, else "a photo of a {}.").
    """
    kind = "array"

    def __init__(self, name: str, split: str, data_dir: Optional[str] = None,
                 image_key: str = "image", caption_key: str = "", label_key: str = "",
                 classnames: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None):
        import tensorflow_datasets as tfds
        from clipjax.evals import classnames as cn
        self.name, self.split = name, split
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:
            raise DataError(
                f"tfds.data_source({name!r}, split={split!r}) failed: {type(e).__name__}: {e}. "
                f"Random access needs the dataset prepared in ArrayRecord format: run "
                f"`tfds build {name} --file_format=array_record` (or `tfds convert_format` on an "
                f"existing TFRecord copy), or convert it to shards with python -m clipjax.data.shards"
            ) from e
        if not caption_key and not label_key:
            raise DataError(f"TFDS source {name!r}: set data.caption_key (e.g. 'captions/text') "
                            f"or data.label_key (e.g. 'label') so examples have text")
        base = cn.dataset_base(name)
        if label_key:
            if classnames is None:
                if base in cn.CLASSNAMES:
                    classnames = cn.CLASSNAMES[base]
                else:
                    builder = tfds.builder(name, data_dir=data_dir or None)
                    classnames = [n.replace("_", " ") for n in builder.info.features[label_key].names]
            self.classnames = list(classnames)
        self.templates = tuple(templates or cn.templates_for(name, default=("a photo of a {}.",)))
        self.has_labels = bool(label_key)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, index: int) -> Example:
        ex = self.ds[int(index)]
        try:
            image = np.asarray(_get_path(ex, self.image_key))
        except KeyError:
            raise DataError(f"TFDS {self.name}: no image feature {self.image_key!r}; features: "
                            f"{sorted(ex)}; set data.image_key")
        label = NO_LABEL
        if self.label_key:
            label = int(np.asarray(_get_path(ex, self.label_key)))
        if self.caption_key:
            try:
                captions = [c for c in _as_texts(_get_path(ex, self.caption_key)) if c.strip()]
            except KeyError:
                raise DataError(f"TFDS {self.name}: no caption feature {self.caption_key!r}; "
                                f"features: {sorted(ex)}; set data.caption_key")
            if not captions:
                raise SkipExample("empty_caption", f"{self.name}[{index}]")
        else:
            captions = [t.format(self.classnames[label]) for t in self.templates]
        return Example(image=image, captions=captions, label=label, key=f"{self.name}/{index}")
