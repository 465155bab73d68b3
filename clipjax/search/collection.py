"""What gets indexed: the items of a folder of images, a CSV/JSONL manifest, or TFRecord shards.

Each item has a stable ``id`` — the identity used to skip already-embedded items when ``index``
is re-run — and knows how to read its encoded bytes:

    folder     id = path relative to the folder (sidecar .txt caption, optional)
    manifest   id = the ``key`` column, else the path as written (caption column, optional)
    shards     id = "<shard file name>#<record number>" (record key / caption / attrs kept)

Listing a folder or manifest reads no image; listing shards reads only their ``.idx`` offsets.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Optional

from clipjax.search.encoder import SearchError


@dataclasses.dataclass
class Item:
    id: str
    path: str                      # image file, or the shard file
    record: int = -1               # record number inside the shard file ``path`` (shards only)
    caption: Optional[str] = None
    key: Optional[str] = None      # the record's own key (shards)
    attrs: Optional[dict] = None   # the record's attributes (shards written with attrs)

    def worker(self, num_workers: int) -> int:
        """The worker (process) that embeds this item: a stable hash of the id."""
        return zlib.crc32(self.id.encode("utf-8", "surrogateescape")) % num_workers


def is_shards(path: str) -> bool:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset.json")):
            return True
        names = os.listdir(path)
        return any(n.endswith(".tfrecord") or ".tfrecord-" in n for n in names) and not any(
            os.path.splitext(n)[1].lower() in _image_exts() for n in names)
    return ".tfrecord" in os.path.basename(path) or any(c in path for c in "*?[")


def _image_exts():
    from clipjax.data.sources import IMAGE_EXTENSIONS
    return IMAGE_EXTENSIONS


def _caption_or_none(raw) -> Optional[str]:
    from clipjax.data.sources import SkipExample, read_caption
    if isinstance(raw, (list, tuple)):
        raw = raw[0] if raw else None
    try:
        return read_caption(raw)[0]
    except SkipExample:
        return None


class Collection:
    """The items of ``path`` (see the module docstring) and a reader for their bytes."""

    def __init__(self, path: str):
        from clipjax.data import sources
        if not path:
            raise SearchError("--images is required: a folder of images, a .csv/.jsonl manifest, "
                              "or a folder/glob of TFRecord shards (python -m clipjax.data.shards)")
        self.path = os.path.abspath(path) if "://" not in path else path
        self.shards = None
        if is_shards(path):
            try:
                self.shards = sources.ShardsSource(path)
            except sources.DataError as e:
                raise SearchError(str(e)) from None
            self.kind = "shards"
            self.items, self._start = [], {}
            for s, fname in enumerate(self.shards.files):
                base = os.path.basename(fname)
                self._start[fname] = int(self.shards.cum[s])
                for r in range(int(self.shards.cum[s + 1] - self.shards.cum[s])):
                    self.items.append(Item(id=f"{base}#{r}", path=fname, record=r))
        else:
            if not os.path.exists(path):
                raise SearchError(f"--images {path!r}: no such folder or file")
            try:
                rows = sources.list_rows(path)
            except sources.DataError as e:
                raise SearchError(str(e)) from None
            self.kind = "folder" if os.path.isdir(path) else "manifest"
            self.items = [Item(id=r.key, path=os.path.abspath(r.path), caption=_caption_or_none(r.caption))
                          for r in rows]
        seen = set()
        for it in self.items:
            if it.id in seen:
                raise SearchError(f"{path}: two entries share the id {it.id!r}; give manifest rows "
                                  f"unique 'key' values")
            seen.add(it.id)

    def read(self, item: Item) -> tuple[bytes, Item]:
        """Encoded bytes of ``item`` (shards: also fills caption/key from the record).

        Raises ``SkipExample`` ('missing_file', 'unreadable_file', 'empty_file', ...)."""
        from clipjax.data.sources import DataError, SkipExample, parse_tf_example
        if self.shards is not None:
            try:
                image, caps, key, _, attrs = parse_tf_example(
                    self.shards.read_record(self._start[item.path] + item.record))
            except (DataError, OSError) as e:
                raise SkipExample("corrupt_record", str(e)) from None
            except Exception as e:  # protobuf DecodeError: a damaged record payload
                raise SkipExample("corrupt_record", f"{type(e).__name__}: {e}") from None
            caption = next((c for c in caps if c.strip()), None)
            item = dataclasses.replace(item, caption=caption, key=key or None, attrs=attrs or None)
            return image, item
        try:
            with open(item.path, "rb") as f:
                return f.read(), item
        except FileNotFoundError:
            raise SkipExample("missing_file", item.path) from None
        except OSError as e:
            raise SkipExample("unreadable_file", f"{item.path}: {e}") from None
