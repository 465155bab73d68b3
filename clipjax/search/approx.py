"""Approximate nearest-neighbour search with usearch (HNSW), an optional dependency.

    pip install clipjax[search]        # or: pip install 'usearch>=2.12'

How a query runs: the HNSW graph (vectors quantised to int8 by default) proposes
``oversample * k`` candidates, which are re-scored exactly with the index's stored embeddings
(the same float16/float32 rows exact search reads), and the best ``k`` are returned. Returned
scores are therefore exact cosines; only *which* rows are candidates is approximate.

How wide the graph walk is (``expansion_search``, HNSW's ``ef``) is calibrated when the graph is
built, because the width needed depends on the data: on 100,000 clustered 512-d vectors a walk
of 48 finds the top-10, on 100,000 i.i.d. random ones it takes 3,072 (docs/search.md). Calibration holds
out ``calibration_queries`` random rows, builds the graph over the others, computes their exact
top-10 among the others, and picks the smallest width on a ladder (48, 64, 96, ..., 8192) whose
top-10 agreement with exact reaches ``target_recall``; then it adds the held-out rows. The chosen
width and the measured agreement are stored in ``approx.json``.

The graph is stored next to the chunks (``approx.usearch`` + ``approx.json``); ``approx.json``
records the chunk files it covers, so it is rebuilt automatically when ``index`` added rows.
Keys are the index's global row numbers. The graph holds the rows *centred and scaled*:
``(x - mean) * scale`` (``mean`` of all rows; ``scale`` maps the 99.99th percentile of the
centred components to 1, so int8 uses its whole range), compared by squared L2 distance; queries
get the same transform. For unit-length rows ``|q - x|^2 = |q|^2 + 1 - 2 q.x``; centring (a
translation) leaves L2 distances unchanged and scaling multiplies them all by ``scale^2``, so the
graph's order is the cosine order (up to quantisation). Centring matters for real embeddings, which share a large common direction
(all pairwise cosines high): quantising them uncentred loses the differences between them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

INSTALL_HINT = "pip install clipjax[search]  (or: pip install 'usearch>=2.12')"
FORMAT = "clipjax-approx-v2"
QUANTIZATIONS = ("i8", "f16", "f32")
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
CALIBRATION_K = 10
MIN_ROWS_TO_CALIBRATE = 1000  # below this the walk is simply as wide as the index (exhaustive, cheap)


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
    """usearch HNSW graph + re-ranking settings (defaults measured in docs/search.md).

    - ``connectivity`` (HNSW's M, graph degree) and ``expansion_add`` (efConstruction): build
      time and memory for graph quality (fewer rows visited per query at a given agreement).
    - ``expansion_search`` (ef): width of the walk per query; 0 = calibrated at build time to reach
      ``target_recall`` top-10 agreement with exact search on ``calibration_queries`` held-out rows.
    - ``quantization``: how the graph stores vectors: ``i8`` (1 byte per component, fastest;
      candidates are re-ranked exactly anyway), ``f16`` or ``f32``.
    - ``oversample``: the graph proposes ``oversample * k`` candidates, re-scored exactly.
    """
    connectivity: int = 32
    expansion_add: int = 128
    expansion_search: int = 0
    quantization: str = "i8"
    oversample: int = 4
    target_recall: float = 0.97
    calibration_queries: int = 200

    def validate(self) -> "HNSWParams":
        from clipjax.search.encoder import SearchError
        problems = []
        if self.connectivity < 2:
            problems.append(f"connectivity={self.connectivity} (use >= 2, e.g. 16-64)")
        if self.expansion_add < 1:
            problems.append(f"expansion_add={self.expansion_add} (use >= 1, e.g. 128)")
        if self.expansion_search < 0:
            problems.append(f"expansion_search={self.expansion_search} (use 0 = calibrated, or >= 1)")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization={self.quantization!r} (use one of {', '.join(QUANTIZATIONS)})")
        if self.oversample < 1:
            problems.append(f"oversample={self.oversample} (use >= 1, e.g. 4)")
        if not 0 < self.target_recall <= 1:
            problems.append(f"target_recall={self.target_recall} (a fraction in (0, 1], e.g. 0.97)")
        if self.calibration_queries < 0:
            problems.append(f"calibration_queries={self.calibration_queries} (use >= 0; 0 = no calibration)")
        elif self.calibration_queries == 0 and self.expansion_search == 0:
            problems.append("expansion_search=0 (calibrated) with calibration_queries=0: set calibration_queries "
                            ">= 1 (e.g. 200) or a fixed expansion_search")
        if problems:
            raise SearchError("bad HNSWParams: " + "; ".join(problems))
        return self


def _num_rows(arrays: Sequence[np.ndarray]) -> int:
    return int(sum(len(a) for a in arrays))


@dataclasses.dataclass
class Graph:
    """A usearch index plus the transform its vectors went through (see the module docstring)."""
    index: Any
    mean: np.ndarray     # d float32
    scale: float
    quantization: str

    def encode(self, v: np.ndarray) -> np.ndarray:
        """Rows or queries -> what the graph stores (contiguous; int8 for ``i8``)."""
        z = (np.asarray(v, np.float32) - self.mean) * np.float32(self.scale)
        if self.quantization == "i8":
            return np.ascontiguousarray(np.clip(np.rint(z * 127), -127, 127).astype(np.int8))
        return np.ascontiguousarray(z, {"f16": np.float16, "f32": np.float32}[self.quantization])

    def __len__(self) -> int:
        return len(self.index)

    def transform(self) -> dict:
        return {"mean": [float(m) for m in self.mean], "scale": float(self.scale)}

    def save(self, path: str) -> None:
        self.index.save(path)


def _transform(arrays: Sequence[np.ndarray], n: int, rng, sample: int = 20000, block: int = 16384):
    """(mean of all rows, scale = 1 / the 99.99th percentile of |row - mean| over a sample)."""
    total = None
    for arr in arrays:
        for s in range(0, len(arr), block):
            part = np.asarray(arr[s:s + block], np.float64).sum(0)
            total = part if total is None else total + part
    mean = (total / max(n, 1)).astype(np.float32)
    ids = np.sort(rng.choice(n, min(n, sample), replace=False))
    rows, offset = [], 0
    for arr in arrays:
        sel = ids[(ids >= offset) & (ids < offset + len(arr))] - offset
        if len(sel):
            rows.append(np.asarray(arr[sel], np.float32))
        offset += len(arr)
    spread = float(np.quantile(np.abs(np.concatenate(rows) - mean), 0.9999))
    return mean, 1.0 / max(spread, 1e-12)


def _add(graph: Graph, arrays: Sequence[np.ndarray], keep: Optional[np.ndarray], progress: bool,
         batch: int = 16384) -> None:
    """Adds the rows of ``arrays`` (keys = global row numbers) where ``keep`` is True (all if None)."""
    offset = 0
    for arr in arrays:
        for s in range(0, len(arr), batch):
            part = np.asarray(arr[s:s + batch], np.float32)
            keys = np.arange(offset + s, offset + s + len(part), dtype=np.uint64)
            if keep is not None:
                sel = keep[offset + s:offset + s + len(part)]
                part, keys = part[sel], keys[sel]
            if len(keys):
                graph.index.add(keys, graph.encode(part), log=progress)
        offset += len(arr)


def exact_topk_excluding(queries: np.ndarray, arrays: Sequence[np.ndarray], k: int, excluded: np.ndarray,
                         block: int = 8192) -> np.ndarray:
    """Ids (``q k``, by descending inner product) of the exact top-``k`` rows of ``arrays``,
    never returning a row whose ``excluded`` flag is set. numpy, ``block`` rows at a time."""
    q = len(queries)
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.zeros((q, 0), np.int64)
    offset = 0
    for arr in arrays:
        for s in range(0, len(arr), block):
            rows = np.asarray(arr[s:s + block], np.float32)
            sc = queries @ rows.T
            sc[:, excluded[offset + s:offset + s + len(rows)]] = -np.inf
            ids = np.broadcast_to(np.arange(offset + s, offset + s + len(rows)), sc.shape)
            all_s = np.concatenate([best_s, sc], axis=1)
            all_i = np.concatenate([best_i, ids], axis=1)
            kk = min(k, all_s.shape[1])
            part = np.argpartition(-all_s, kk - 1, axis=1)[:, :kk]
            best_s = np.take_along_axis(all_s, part, 1)
            best_i = np.take_along_axis(all_i, part, 1)
        offset += len(arr)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def agreement(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (the exact top-k ids) found in the same row of ``ids``."""
    k = truth.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(t.tolist())) / k for a, t in zip(ids, truth)]))


def build(arrays: Sequence[np.ndarray], dim: int, params: HNSWParams, vectors: Callable[[np.ndarray], np.ndarray],
          progress: bool = False, seed: int = 0):
    """A :class:`Graph` over the rows of ``arrays`` (in order; keys are global row numbers), with
    ``expansion_search`` calibrated when ``params.expansion_search == 0``.

    ``vectors(ids) -> len(ids) x dim`` float32 returns stored rows (for exact re-ranking).
    Returns ``(graph, params with expansion_search resolved, calibration dict)``.
    """
    UIndex = require_usearch()
    params.validate()
    t0 = time.perf_counter()
    n = _num_rows(arrays)
    rng = np.random.default_rng(seed)
    mean, scale = _transform(arrays, n, rng)
    graph = Graph(UIndex(ndim=dim, metric="l2sq", dtype=params.quantization, connectivity=params.connectivity,
                         expansion_add=params.expansion_add), mean, scale, params.quantization)
    m = min(params.calibration_queries, n // 10) if n >= MIN_ROWS_TO_CALIBRATE else 0
    if m == 0:
        _add(graph, arrays, None, progress)
        ef = params.expansion_search or max(n, CALIBRATION_K * params.oversample)
        why = (f"not calibrated: fewer than {MIN_ROWS_TO_CALIBRATE} rows (the walk covers the whole index)"
               if n < MIN_ROWS_TO_CALIBRATE else "not calibrated: calibration_queries=0")
        calib = {"expansion_search": ef, "recall": None, "queries": 0, "note": why}
    else:
        held = np.sort(rng.choice(n, m, replace=False))
        excluded = np.zeros(n, bool)
        excluded[held] = True
        _add(graph, arrays, ~excluded, progress)
        add_s = time.perf_counter() - t0
        queries = vectors(held)
        truth = exact_topk_excluding(queries, arrays, CALIBRATION_K, excluded)
        k_cand = CALIBRATION_K * params.oversample
        if params.expansion_search:
            ladder = [params.expansion_search]
        else:
            ladder = [e for e in EF_LADDER if e >= k_cand] or [k_cand]
        tried = []
        ef = ladder[-1]
        stats: dict = {}
        for e in ladder:
            _, ids = search(graph, queries, CALIBRATION_K, e, params.oversample, vectors, stats)
            rec = agreement(ids, truth)
            tried.append([e, round(rec, 4)])
            if rec >= params.target_recall or e >= n:
                ef = e
                break
        visited = stats["distances"] / (n - m)
        calib = {"expansion_search": ef, "recall": tried[-1][1], "reached_target": tried[-1][1] >= params.target_recall,
                 "target_recall": params.target_recall, "queries": m, "k": CALIBRATION_K, "ladder": tried,
                 "distances_per_query": round(stats["distances"]), "fraction_of_rows": round(visited, 3),
                 "seconds": round(time.perf_counter() - t0 - add_s, 2)}
        if not calib["reached_target"]:
            logging.warning("approximate search: the widest walk tried (expansion_search=%d) agrees with exact "
                            "search on %.1f%% of the top-%d, below target_recall=%s; exact search is the "
                            "better choice for this index", ef, 100 * calib["recall"], CALIBRATION_K,
                            params.target_recall)
        elif visited > 0.5:
            logging.warning("approximate search: reaching %.0f%% agreement with exact search takes a walk that "
                            "scores %.0f%% of the rows (expansion_search=%d): this data has little neighbourhood "
                            "structure, and exact search is likely as fast", 100 * params.target_recall,
                            100 * visited, ef)
        _add(graph, arrays, excluded, progress)
    calib["build_seconds"] = round(time.perf_counter() - t0, 2)
    return graph, dataclasses.replace(params, expansion_search=int(ef)), calib


def load(path: str, transform: dict, quantization: str, view: bool = True) -> Graph:
    UIndex = require_usearch()
    return Graph(UIndex.restore(path, view=view), np.asarray(transform["mean"], np.float32),
                 float(transform["scale"]), quantization)


def search(graph: Graph, queries: np.ndarray, k: int, expansion_search: int, oversample: int,
           vectors: Callable[[np.ndarray], np.ndarray], stats: Optional[dict] = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The graph's ``oversample * k`` candidates per query, re-scored exactly with ``vectors``.
    ``stats`` (a dict, if given) receives ``distances``: graph distances computed per query.

    -> ``scores: q k`` float32 (cosine, descending; ties: smaller row first), ``ids: q k`` int64
    (-1 / -inf when fewer rows than k were found).
    """
    n = len(graph)
    k_cand = max(1, min(max(k, oversample * k), n))
    graph.index.expansion_search = max(int(expansion_search), k_cand)
    queries = np.ascontiguousarray(queries, np.float32)
    q = len(queries)
    m = graph.index.search(graph.encode(queries), k_cand)
    if stats is not None:
        stats["distances"] = float(getattr(m, "computed_distances", np.nan)) / max(q, 1)
    keys = np.asarray(m.keys).reshape(q, -1)
    counts = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.full(q, keys.shape[1])
    valid = np.arange(keys.shape[1])[None, :] < np.minimum(counts, keys.shape[1])[:, None]
    cand = np.where(valid, keys.astype(np.int64, copy=False), -1)
    scores = np.full(cand.shape, -np.inf, np.float32)
    if valid.any():
        rows = vectors(cand[valid])
        qi = np.nonzero(valid)[0]
        scores[valid] = np.einsum("nd,nd->n", queries[qi], rows)
    # best first; among equal scores the smaller row (as exact search orders ties)
    by_id = np.argsort(np.where(valid, cand, np.iinfo(np.int64).max), axis=1, kind="stable")
    cand, scores = np.take_along_axis(cand, by_id, 1), np.take_along_axis(scores, by_id, 1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out_s, out_i = np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)
    if out_s.shape[1] < k:
        pad = k - out_s.shape[1]
        out_s = np.concatenate([out_s, np.full((q, pad), -np.inf, np.float32)], 1)
        out_i = np.concatenate([out_i, np.full((q, pad), -1, np.int64)], 1)
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i
