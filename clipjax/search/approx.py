"""Approximate nearest-neighbour search with usearch (HNSW), an optional dependency.

    pip install clipjax[search]        # or: pip install 'usearch>=2.12'

The graph is stored next to the chunks (``approx.usearch`` + ``approx.json``); ``approx.json``
records the chunk files it covers, so it is rebuilt automatically when ``index`` added rows.
Keys are the index's global row numbers; the metric is the inner product of the (normalised)
embeddings, i.e. cosine similarity (usearch reports ``1 - cosine`` as the distance).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

INSTALL_HINT = "pip install clipjax[search]  (or: pip install 'usearch>=2.12')"


class ApproximateUnavailable(ImportError):
    """usearch is not installed."""
    user_error = True


def require_usearch():
    try:
        from usearch.index import Index as UIndex
    except ImportError as e:
        raise ApproximateUnavailable(
            f"approximate search needs the usearch package, which is not installed ({e}); "
            f"install it with: {INSTALL_HINT} — or use exact search (the default, no --approx)") from None
    return UIndex


@dataclasses.dataclass
class HNSWParams:
    """usearch's HNSW knobs. Higher ``expansion_search`` -> better recall, slower queries;
    ``connectivity`` (graph degree) and ``expansion_add`` trade build time for recall."""
    connectivity: int = 16
    expansion_add: int = 64
    expansion_search: int = 128


def _dtype_name(dtype) -> str:
    return {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}[np.dtype(dtype)]


def build(arrays: Iterable[np.ndarray], dim: int, dtype, params: HNSWParams, progress: bool = False):
    """A usearch index over the rows of ``arrays`` (in order; keys are global row numbers)."""
    UIndex = require_usearch()
    index = UIndex(ndim=dim, metric="ip", dtype=_dtype_name(dtype), connectivity=params.connectivity,
                   expansion_add=params.expansion_add, expansion_search=params.expansion_search)
    offset = 0
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        if len(arr):
            index.add(np.arange(offset, offset + len(arr), dtype=np.uint64), arr, log=progress)
        offset += len(arr)
    return index


def load(path: str, view: bool = True):
    UIndex = require_usearch()
    return UIndex.restore(path, view=view)


def search(index, queries: np.ndarray, k: int, expansion_search: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ``scores: q k`` float32 (cosine, descending), ``ids: q k`` int64 (-1 / -inf when fewer)."""
    index.expansion_search = max(int(expansion_search), k)
    queries = np.ascontiguousarray(queries, np.float32)
    m = index.search(queries, k)
    keys = np.asarray(m.keys).reshape(len(queries), -1)
    dist = np.asarray(m.distances, np.float32).reshape(len(queries), -1)
    counts = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.full(len(queries), keys.shape[1])
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for i, c in enumerate(counts):
        c = min(int(c), k)
        scores[i, :c] = 1.0 - dist[i, :c]
        ids[i, :c] = keys[i, :c].astype(np.int64)
    return scores, ids
