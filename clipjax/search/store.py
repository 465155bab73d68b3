"""The on-disk index and its Python API (format: docs/search.md).

::

    INDEX_DIR/
      index.json              format, embedding dim and dtype, the model spec, the source
      chunks/<stamp>.npy      n x d normalised embeddings (float16 or float32), one file per chunk
      chunks/<stamp>.jsonl    n rows, one JSON object per embedding: id, path, caption, ...
      bad.jsonl               the items the last ``index`` run could not use (id, path, reason)
      model.msgpack           the checkpoint's params when built from --config/--workdir
      approx.usearch/.json    the optional HNSW graph and its settings/calibration (clipjax.search.approx)

A chunk is complete once its ``.jsonl`` exists (written after the ``.npy``, each by atomic
rename), so a killed ``index`` run loses at most the rows of its unfinished chunk, and a re-run
embeds only the items whose id is not in a complete chunk. Row numbers are positions in the
concatenation of the chunks in name order (``<stamp>`` = nanosecond time + worker).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shutil
import time
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from clipjax.search import exact
from clipjax.search.collection import Collection, Item
from clipjax.search.encoder import Encoder, SearchError, decode_image_bytes, load_encoder

FORMAT = "clipjax-search-v1"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _same_model(a: dict, b: dict) -> bool:
    """Model specs equal; a training run's checkpoint is identified by (workdir, step, name) —
    where its config file lives and where its params were saved do not matter."""
    drop = lambda s: {k: v for k, v in s.items() if not (s.get("kind") == "workdir" and k in ("weights", "config"))}
    return drop(a) == drop(b)


def _bad_name(worker_index: int, num_workers: int) -> str:
    return "bad.jsonl" if num_workers == 1 else f"bad-w{worker_index:03d}.jsonl"


@dataclasses.dataclass
class SearchResult:
    """``scores: q k`` cosine similarities (descending), ``ids: q k`` row numbers (-1 = none),
    ``rows[q][r]`` the row's metadata dict (id, path, caption, ...) plus ``row`` and ``score``."""
    queries: list
    scores: np.ndarray
    ids: np.ndarray
    rows: list

    def to_json(self) -> list[dict]:
        return [{"query": q, "results": [dict(r, rank=i + 1) for i, r in enumerate(rows)]}
                for q, rows in zip(self.queries, self.rows)]


@dataclasses.dataclass
class BuildReport:
    embedded: int       # items embedded by this run
    already: int        # items skipped because they were already in the index
    other_workers: int  # items left to other workers (--num_workers > 1)
    bad: list           # [{'id', 'path', 'reason', 'detail'}] items that could not be used
    seconds: float


class Index:
    """An on-disk embedding index. Create with :meth:`build`, reopen with :meth:`open`."""

    def __init__(self, directory: str, meta: dict, encoder: Optional[Encoder] = None):
        self.directory, self.meta = directory, meta
        self._encoder = encoder
        self.chunk_names = sorted(os.path.basename(p)[:-len(".jsonl")]
                                  for p in glob.glob(os.path.join(directory, "chunks", "*.jsonl")))
        self._arrays = [np.load(self._chunk_path(c, ".npy"), mmap_mode="r") for c in self.chunk_names]
        for c, a in zip(self.chunk_names, self._arrays):
            if a.ndim != 2 or a.shape[1] != self.dim:
                raise SearchError(f"{self._chunk_path(c, '.npy')} has shape {a.shape}, expected n x {self.dim}; "
                                  f"the index is damaged: rebuild it with index --overwrite")
        self._starts = np.concatenate([[0], np.cumsum([len(a) for a in self._arrays])]).astype(np.int64)
        self._rows_cache: dict[int, list] = {}
        self._device_blocks = None
        self._graph = None
        self._graph_meta: Optional[dict] = None
        self.cache_bytes = 1 << 30  # exact search keeps indexes up to 1 GiB on the device
        self.build_report: Optional[BuildReport] = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str, encoder: Optional[Encoder] = None) -> "Index":
        """Opens an index folder. ``encoder`` (from :func:`load_encoder`) is used for text/image
        queries; by default the model recorded in ``index.json`` is loaded on first use."""
        meta_path = os.path.join(directory, "index.json")
        if not os.path.exists(meta_path):
            raise SearchError(f"{directory!r} is not a search index (no index.json); build one with "
                              f"python -m clipjax.search index --images=... --out={directory}")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise SearchError(f"{meta_path}: format {meta.get('format')!r}, this clipjax reads {FORMAT!r}")
        return cls(os.path.abspath(directory), meta, encoder)

    def _chunk_path(self, name: str, ext: str) -> str:
        return os.path.join(self.directory, "chunks", name + ext)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(spec=self.meta["model"])
        return self._encoder

    # ---- rows ----------------------------------------------------------------------------
    def _chunk_rows(self, c: int) -> list:
        if c not in self._rows_cache:
            with open(self._chunk_path(self.chunk_names[c], ".jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if len(rows) != len(self._arrays[c]):
                raise SearchError(f"chunk {self.chunk_names[c]}: {len(rows)} rows but {len(self._arrays[c])} "
                                  f"embeddings; the index is damaged: rebuild it with index --overwrite")
            self._rows_cache[c] = rows
        return self._rows_cache[c]

    def row(self, i: int) -> dict:
        """Metadata of row ``i``: id, path, caption (if any), key/record/attrs (shards)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of an index with {len(self)} rows")
        c = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._chunk_rows(c)[i - int(self._starts[c])]

    def rows(self) -> Iterator[dict]:
        for c in range(len(self.chunk_names)):
            yield from self._chunk_rows(c)

    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows()]

    def embeddings(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the embedding matrix as float32 ``n d``."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for c, a in enumerate(self._arrays):
            lo, hi = int(self._starts[c]), int(self._starts[c + 1])
            if hi > start and lo < stop:
                parts.append(np.asarray(a[max(start, lo) - lo:min(stop, hi) - lo], np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def bad(self) -> list[dict]:
        """The items the last ``index`` run(s) skipped, with their reason."""
        out = []
        for p in sorted(glob.glob(os.path.join(self.directory, "bad*.jsonl"))):
            with open(p, encoding="utf-8") as f:
                out += [json.loads(line) for line in f if line.strip()]
        return out

    # ---- queries -------------------------------------------------------------------------
    def embed_queries(self, queries: Any = None, *, texts: Any = None, images: Any = None) -> tuple[np.ndarray, list]:
        """(``q d`` normalised float32 query embeddings, labels) from exactly one kind of query."""
        given = [x is not None for x in (queries, texts, images)]
        if sum(given) != 1:
            raise SearchError("search needs exactly one of: query embeddings, texts=, images=")
        if texts is not None:
            texts = [texts] if isinstance(texts, str) else list(texts)
            return self.encoder.embed_texts(texts), texts
        if images is not None:
            single = isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3)
            images = [images] if single else list(images)
            labels = [os.fspath(i) if isinstance(i, (str, os.PathLike)) else f"image[{n}]"
                      for n, i in enumerate(images)]
            return self.encoder.embed_images(images), labels
        q = np.asarray(queries, np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise SearchError(f"query embeddings must be q x {self.dim} (this index's dimension); got {q.shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(q)) or np.any(norms == 0):
            raise SearchError("query embeddings must be finite and non-zero")
        return q / norms, [f"vector[{n}]" for n in range(len(q))]

    def search(self, queries: Any = None, k: int = 10, *, texts: Any = None, images: Any = None,
               approximate: bool = False, block_rows: int = 65536, expansion_search: Optional[int] = None,
               oversample: Optional[int] = None) -> SearchResult:
        """Top-``k`` rows by cosine similarity for query embeddings (``q d`` or ``d``), ``texts``
        (str or list) or ``images`` (paths, PIL images or ``h w 3`` uint8 arrays).

        Exact by default (jitted, ``block_rows`` rows at a time, so the index need not fit in
        memory); ``approximate=True`` uses the usearch HNSW graph (built, calibrated and saved on
        first use): its ``oversample * k`` candidates are re-scored exactly with the stored rows.
        ``expansion_search`` (width of the graph walk) and ``oversample`` default to the graph's
        settings (:meth:`approximate_info`); raise either for agreement, lower for speed.
        """
        if int(k) < 1:
            raise SearchError(f"k={k}: use k >= 1")
        if len(self) == 0:
            raise SearchError(f"the index at {self.directory} is empty; run index first")
        q, labels = self.embed_queries(queries, texts=texts, images=images)
        k = min(int(k), len(self))
        if approximate:
            from clipjax.search import approx
            for name, v in (("expansion_search", expansion_search), ("oversample", oversample)):
                if v is not None and int(v) < 1:
                    raise SearchError(f"{name}={v}: use >= 1 (or None for the graph's setting)")
            graph, params = self.approximate_index()
            scores, ids = approx.search(graph, q, k, expansion_search or params.expansion_search,
                                        oversample or params.oversample, self._gather)
        else:
            scores, ids = exact.topk_blocks(q, self._blocks(block_rows), k)
        rows = [[dict(self.row(int(i)), row=int(i), score=float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]
        return SearchResult(labels, scores, ids, rows)

    def _blocks(self, block_rows: int):
        """The embeddings as (block, valid, offset): kept on the device after the first search
        when they take at most ``cache_bytes`` (then no disk read or copy per query), else read
        from the memory-mapped chunk files block by block. On CPU, float16 rows are widened to
        float32 once (XLA:CPU converts float16 slowly, so converting per query would dominate)."""
        import jax
        block_rows = exact.even_block_rows(len(self), block_rows)
        widen = np.float32 if jax.default_backend() == "cpu" else None
        itemsize = np.dtype(widen or _DTYPES[self.meta["dtype"]]).itemsize
        if len(self) * self.dim * itemsize > self.cache_bytes:
            return exact.iter_blocks(self._arrays, block_rows, widen)
        if self._device_blocks is None or self._device_blocks[0] != block_rows:
            self._device_blocks = (block_rows, [(jax.device_put(b), v, o)
                                                for b, v, o in exact.iter_blocks(self._arrays, block_rows, widen)])
        return self._device_blocks[1]

    def _gather(self, ids: np.ndarray) -> np.ndarray:
        """Stored embeddings of the rows ``ids`` (1-d, any order) as float32 ``len(ids) d``."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        chunk = np.searchsorted(self._starts, ids, side="right") - 1
        for c in np.unique(chunk):
            sel = chunk == c
            out[sel] = self._arrays[c][ids[sel] - self._starts[c]]
        return out

    def approximate_index(self, params=None, rebuild: bool = False, progress: bool = False):
        """(:class:`approx.Graph`, HNSWParams with the calibrated ``expansion_search``): loaded from
        ``approx.usearch`` if it covers every chunk and was built with ``params`` (when given),
        else built from the embeddings, calibrated and saved (``approx.json``)."""
        if params is not None:
            params.validate()
        if not rebuild and self._graph is not None and (params is None or params == self._graph_meta["requested"]):
            return self._graph
        self._graph, self._graph_meta = self._load_or_build_graph(params, rebuild, progress)
        return self._graph

    def approximate_info(self) -> dict:
        """The graph's ``approx.json`` (building the graph if needed): ``params`` (as used),
        ``requested`` (as asked), ``calibration`` (chosen ``expansion_search``, measured top-10
        agreement on held-out rows, the ladder tried) and ``build_seconds`` (the ``transform``'s
        mean vector is left out)."""
        self.approximate_index()
        meta = {k: v for k, v in self._graph_meta.items() if k != "transform"}
        meta["requested"] = dataclasses.asdict(meta["requested"])
        return meta

    def _load_or_build_graph(self, params, rebuild: bool, progress: bool):
        from clipjax.search import approx
        path, meta_path = (os.path.join(self.directory, n) for n in ("approx.usearch", "approx.json"))
        if not rebuild and os.path.exists(meta_path) and os.path.exists(path):
            with open(meta_path) as f:
                meta = json.load(f)
            if (meta.get("format") == approx.FORMAT and meta.get("chunks") == self.chunk_names
                    and (params is None or meta.get("requested") == dataclasses.asdict(params))):
                used = approx.HNSWParams(**meta["params"])
                meta["requested"] = approx.HNSWParams(**meta["requested"])
                return (approx.load(path, meta["transform"], used.quantization), used), meta
        requested = params or approx.HNSWParams()
        graph, used, calib = approx.build(self._arrays, self.dim, requested, self._gather, progress)
        graph.save(path + ".tmp")
        os.replace(path + ".tmp", path)
        meta = {"format": approx.FORMAT, "chunks": self.chunk_names, "rows": len(self),
                "params": dataclasses.asdict(used), "requested": dataclasses.asdict(requested),
                "calibration": calib, "build_seconds": calib.pop("build_seconds"), "transform": graph.transform()}
        _atomic_write(meta_path, json.dumps(meta).encode())
        meta["requested"] = requested
        return (graph, used), meta

    def dedup(self, threshold: float = 0.95, block_rows: int = 4096) -> tuple[np.ndarray, list]:
        """Near-duplicates: ``pairs`` (``m x 3``: row i < row j, cosine >= threshold; descending)
        and ``groups`` (connected components of those pairs, largest first). Exact, in
        ``block_rows`` blocks: two blocks in memory at a time."""
        if not -1.0 <= threshold <= 1.0:
            raise SearchError(f"threshold={threshold}: a cosine similarity in [-1, 1] (e.g. 0.95)")
        n = len(self)
        nb = -(-n // block_rows)

        def load(b):
            blk = np.zeros((block_rows, self.dim), np.float32)
            part = self.embeddings(b * block_rows, (b + 1) * block_rows)
            blk[:len(part)] = part
            return blk, len(part), b * block_rows
        pairs = exact.duplicate_pairs(None, threshold, load_block=load, num_blocks=nb)
        return pairs, exact.group_pairs(pairs, n)

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def build(cls, images: str, out: str, *, encoder: Optional[Encoder] = None, model: Optional[str] = None,
              weights: Optional[str] = None, config=None, workdir: Optional[str] = None,
              step: Optional[int] = None, batch_size: int = 64, chunk_rows: int = 4096,
              dtype: str = "float16", num_threads: int = 8, worker_index: int = 0, num_workers: int = 1,
              overwrite: bool = False, progress: bool = True, config_file: Optional[str] = None) -> "Index":
        """Embeds the images of ``images`` (folder, manifest or shards) into the index ``out``.

        Resumable: items whose id is already in ``out`` are skipped, so re-running after adding
        files embeds only the new ones. Unusable items (corrupt, empty, missing, too large) are
        skipped and listed in ``out/bad.jsonl`` (and ``index.build_report.bad``). With
        ``num_workers`` > 1, worker ``worker_index`` embeds the items whose id hashes to it (run one
        per host/process on the same ``out``; each writes its own chunks).
        """
        if dtype not in _DTYPES:
            raise SearchError(f"dtype={dtype!r}: use float16 or float32")
        if not 0 <= worker_index < num_workers:
            raise SearchError(f"worker_index={worker_index} must be in [0, num_workers={num_workers})")
        if batch_size < 1 or chunk_rows < 1:
            raise SearchError("batch_size and chunk_rows must be >= 1")
        t0 = time.time()
        collection = Collection(images)
        if encoder is None:
            encoder = load_encoder(model=model, weights=weights, config=config, workdir=workdir, step=step,
                                   config_file=config_file)
        meta = cls._prepare_dir(out, encoder, collection, dtype, overwrite)
        index = cls(os.path.abspath(out), meta, encoder)
        done = set(index.ids())
        mine = [it for it in collection.items if num_workers == 1 or it.worker(num_workers) == worker_index]
        todo = [it for it in mine if it.id not in done]
        report = BuildReport(embedded=0, already=len(mine) - len(todo),
                             other_workers=len(collection.items) - len(mine), bad=[], seconds=0.0)
        writer = _ChunkWriter(index.directory, _DTYPES[dtype], chunk_rows, worker_index)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), unit="img", desc="embedding", dynamic_ncols=True)
        try:
            for items, arrays in _load_batches(collection, todo, encoder, batch_size, num_threads, report.bad, bar):
                if items:
                    writer.add(items, encoder.embed_preprocessed(np.stack(arrays), batch_size))
                    report.embedded += len(items)
        finally:
            writer.flush()  # keep whatever was embedded, even when interrupted
            if bar is not None:
                bar.close()
            lines = "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in report.bad)
            _atomic_write(os.path.join(index.directory, _bad_name(worker_index, num_workers)), lines.encode())
        report.seconds = time.time() - t0
        index = cls.open(out, encoder)
        index.build_report = report
        return index

    @classmethod
    def from_embeddings(cls, out: str, embeddings: np.ndarray, rows: Optional[Sequence[dict]] = None, *,
                        dtype: str = "float16", chunk_rows: int = 65536, model: Optional[dict] = None) -> "Index":
        """An index over precomputed embeddings (``n d``; normalised here). ``rows`` are their
        metadata dicts (each with a unique 'id'; default ``{'id': str(i)}``); ``model`` the spec of
        the model that made them (needed only for text/image queries)."""
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or not len(emb):
            raise SearchError(f"embeddings must be a non-empty n x d array; got shape {emb.shape}")
        if dtype not in _DTYPES:
            raise SearchError(f"dtype={dtype!r}: use float16 or float32")
        if os.path.exists(os.path.join(out, "index.json")):
            raise SearchError(f"{out!r} already holds an index; choose a new folder")
        rows = [{"id": str(i)} for i in range(len(emb))] if rows is None else [dict(r) for r in rows]
        if len(rows) != len(emb) or len({r.get("id") for r in rows}) != len(rows) or any("id" not in r for r in rows):
            raise SearchError("rows must be one dict per embedding, each with a unique 'id'")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
        meta = {"format": FORMAT, "dim": int(emb.shape[1]), "dtype": dtype, "model": model or {"kind": "none"},
                "source": {"path": None, "kind": "embeddings"}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(os.path.join(out, "index.json"), (json.dumps(meta, indent=2) + "\n").encode())
        writer = _ChunkWriter(os.path.abspath(out), _DTYPES[dtype], chunk_rows, 0)
        for s in range(0, len(emb), chunk_rows):
            writer.rows = rows[s:s + chunk_rows]
            writer.embs = [emb[s:s + chunk_rows].astype(_DTYPES[dtype])]
            writer.flush()
        return cls.open(out)

    @classmethod
    def _prepare_dir(cls, out: str, encoder: Encoder, collection: Collection, dtype: str, overwrite: bool) -> dict:
        meta_path = os.path.join(out, "index.json")
        ours = lambda n: n in ("chunks", "model.msgpack") or n.startswith("index.json.tmp")  # another worker's
        if os.path.isdir(out) and not os.path.exists(meta_path) and not all(map(ours, os.listdir(out))):
            raise SearchError(f"--out {out!r} is a non-empty folder that is not a search index (no "
                              f"index.json); choose a new or empty folder")
        if os.path.exists(out) and not os.path.isdir(out):
            raise SearchError(f"--out {out!r} is a file; choose a folder")
        if overwrite and os.path.exists(out):
            for name in ("chunks", "approx.usearch", "approx.json", "index.json", "model.msgpack"):
                p = os.path.join(out, name)
                if os.path.abspath(p) == encoder.spec.get("weights"):
                    continue  # the model we are about to use lives there
                shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
            for p in glob.glob(os.path.join(out, "bad*.jsonl")):
                os.remove(p)
        spec = dict(encoder.spec)
        source = {"path": collection.path, "kind": collection.kind}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            problems = []
            if meta.get("format") != FORMAT:
                problems.append(f"format {meta.get('format')!r} (expected {FORMAT!r})")
            if not _same_model(meta.get("model", {}), spec):
                problems.append(f"model {meta.get('model')} (this run: {spec})")
            if meta.get("source") != source:
                problems.append(f"source {meta.get('source')} (this run: {source})")
            if meta.get("dtype") != dtype:
                problems.append(f"dtype {meta.get('dtype')} (this run: {dtype})")
            if problems:
                raise SearchError(f"{out!r} already holds an index built with a different " + "; ".join(problems)
                                  + ". Pass the same options to add to it, --overwrite to rebuild it, "
                                    "or a new --out")
            if spec["kind"] == "workdir":  # same checkpoint: the index already holds its params
                encoder.spec["weights"] = meta["model"]["weights"]
            os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
            return meta
        os.makedirs(out, exist_ok=True)
        if spec["kind"] == "workdir":  # make the index self-contained: keep the exported params
            dst = os.path.join(os.path.abspath(out), "model.msgpack")
            encoder.save_model(dst + ".tmp")
            os.replace(dst + ".tmp", dst)
            spec["weights"] = encoder.spec["weights"] = dst
        meta = {"format": FORMAT, "dim": encoder.dim, "dtype": dtype, "model": spec,
                "image_size": encoder.image_size, "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
        os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
        return meta


class _ChunkWriter:
    """Buffers embeddings + rows and writes them as chunk files of ``chunk_rows`` rows."""

    def __init__(self, directory: str, dtype, chunk_rows: int, worker_index: int):
        self.dir = os.path.join(directory, "chunks")
        self.dtype, self.chunk_rows, self.worker = dtype, chunk_rows, worker_index
        self.rows: list[dict] = []
        self.embs: list[np.ndarray] = []
        # a previous run of this worker killed mid-chunk leaves an .npy without .jsonl
        for p in glob.glob(os.path.join(self.dir, f"*-w{worker_index:03d}.npy")):
            if not os.path.exists(p[:-4] + ".jsonl"):
                os.remove(p)

    def add(self, items: Sequence[Item], embs: np.ndarray) -> None:
        for it in items:
            row = {"id": it.id, "path": it.path}
            for key in ("caption", "key", "attrs"):
                if getattr(it, key) is not None:
                    row[key] = getattr(it, key)
            if it.record >= 0:
                row["record"] = it.record
            self.rows.append(row)
        self.embs.append(np.asarray(embs, self.dtype))
        if len(self.rows) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{time.time_ns():020d}-w{self.worker:03d}"
        base = os.path.join(self.dir, name)
        emb = np.concatenate(self.embs)
        tmp = f"{base}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, base + ".npy")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
        _atomic_write(base + ".jsonl", lines.encode("utf-8", "surrogateescape"))
        self.rows, self.embs = [], []


def _load_batches(collection: Collection, todo: list, encoder: Encoder, batch_size: int, num_threads: int,
                  bad: list, bar) -> Iterator[tuple[list, list]]:
    """Reads, validates (the shards CLI's checks) and preprocesses items on a thread pool; yields
    (items, preprocessed arrays) batches of ``batch_size`` good items; bad ones go to ``bad``."""
    from clipjax.data.sources import SkipExample

    def load(item: Item):
        try:
            data, item = collection.read(item)
            return item, encoder.preprocess(decode_image_bytes(data)), None
        except SkipExample as e:
            detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", e.detail)  # PIL's noise
            return item, None, {"id": item.id, "path": item.path, "reason": e.reason, "detail": detail}

    items, arrays = [], []
    ahead = max(batch_size * 2, 32)  # items in flight: decoding overlaps embedding
    pending: collections.deque = collections.deque()
    it = iter(todo)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        while True:
            while len(pending) < ahead:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending.append(pool.submit(load, nxt))
            if not pending:
                break
            item, arr, err = pending.popleft().result()
            if err is not None:
                bad.append(err)
            else:
                items.append(item)
                arrays.append(arr)
            if bar is not None:
                bar.update(1)
                if err is not None:
                    bar.set_postfix(bad=len(bad), refresh=False)
            if len(items) == batch_size:
                yield items, arrays
                items, arrays = [], []
    if items:
        yield items, arrays
