"""Exact cosine search and near-duplicate detection over embeddings streamed in fixed-size blocks.

The index never has to fit in memory (host or device): rows arrive as ``block_rows x d`` blocks
(the last one zero-padded, with the number of valid rows passed in), and each block updates a
running top-k inside one jitted function. Every block has the same shape, so it compiles once
per (query bucket, k, block_rows, d, dtype).
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = float("-inf")


def _query_bucket(q: int) -> int:
    """Queries are padded to a power of two so a few shapes cover every batch size (a single
    query stays a matrix-vector product: padding it would multiply the work)."""
    return 1 << (max(q, 1) - 1).bit_length()


def even_block_rows(n: int, block_rows: int, multiple: int = 1024) -> int:
    """The block size <= ``block_rows`` (rounded up to ``multiple``) that splits ``n`` rows into
    the fewest, nearly equal blocks, so the last block is not mostly padding."""
    blocks = max(1, -(-n // block_rows))
    return -(-(-(-n // blocks)) // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(4, 5))
def _topk_update(queries, block, valid, offset, best_scores, best_ids, *, k: int):
    """One block of the running top-k.

    queries: q d float32 (normalised); block: c d (float16/float32, rows >= valid are padding);
    best_scores, best_ids: q k (running result, -inf / -1 where empty). Returns the new q k pair.
    """
    c = block.shape[0]
    scores = jnp.dot(queries, block.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)                      # q c
    row = jnp.arange(c, dtype=jnp.int32)
    scores = jnp.where(row[None, :] < valid, scores, NEG_INF)
    kk = min(k, c)
    top_s, top_pos = jax.lax.top_k(scores, kk)                                # q kk
    top_i = (top_pos + offset).astype(jnp.int32)
    top_i = jnp.where(jnp.isfinite(top_s), top_i, -1)
    all_s = jnp.concatenate([best_scores, top_s], axis=1)
    all_i = jnp.concatenate([best_ids, top_i], axis=1)
    new_s, pos = jax.lax.top_k(all_s, k)  # stable: earlier (smaller) ids win ties
    return new_s, jnp.take_along_axis(all_i, pos, axis=1)


def iter_blocks(arrays: Iterable[np.ndarray], block_rows: int, dtype=None
                ) -> Iterator[tuple[np.ndarray, int, int]]:
    """Regroups row arrays (e.g. memory-mapped chunk files) into ``(block, valid, offset)`` with
    ``block: block_rows d`` zero-padded after ``valid`` rows, and ``offset`` the global id of row 0.
    ``dtype``: convert while copying (default: keep the arrays' dtype)."""
    buf: Optional[np.ndarray] = None
    filled, offset = 0, 0
    for arr in arrays:
        if buf is None:
            buf = np.zeros((block_rows, arr.shape[1]), dtype or arr.dtype)
        pos = 0
        while pos < len(arr):
            take = min(block_rows - filled, len(arr) - pos)
            buf[filled:filled + take] = arr[pos:pos + take]
            filled += take
            pos += take
            if filled == block_rows:
                yield buf, filled, offset
                offset += filled
                buf = np.zeros_like(buf)
                filled = 0
    if buf is not None and filled:
        buf[filled:] = 0
        yield buf, filled, offset


def topk(queries: np.ndarray, arrays: Iterable[np.ndarray], k: int, block_rows: int = 65536
         ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries: q d`` against the rows of ``arrays`` (in order).

    Returns ``scores: q k`` float32 (descending) and ``ids: q k`` int64 global row numbers; when
    fewer than k rows exist the tail is ``-inf`` / ``-1``.
    """
    return topk_blocks(queries, iter_blocks(arrays, block_rows), k)


def topk_blocks(queries: np.ndarray, blocks: Iterable[tuple], k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` over ``(block, valid, offset)`` triples (numpy or device-resident blocks)."""
    queries = np.asarray(queries, np.float32)
    q = len(queries)
    qb = _query_bucket(q)
    padded = np.zeros((qb, queries.shape[1]), np.float32)
    padded[:q] = queries
    qd = jnp.asarray(padded)
    best_s = jnp.full((qb, k), NEG_INF, jnp.float32)
    best_i = jnp.full((qb, k), -1, jnp.int32)
    for block, valid, offset in blocks:
        if block.shape[1] != queries.shape[1]:
            raise ValueError(f"queries have dimension {queries.shape[1]} but the index rows have "
                             f"{block.shape[1]}; embed the queries with the index's model")
        best_s, best_i = _topk_update(qd, jnp.asarray(block), np.int32(valid), np.int32(offset),
                                      best_s, best_i, k=k)
    return np.asarray(best_s)[:q], np.asarray(best_i)[:q].astype(np.int64)


@functools.partial(jax.jit, static_argnames=("same",))
def _pair_scores(a, b, valid_a, valid_b, threshold, *, same: bool):
    """``a: n d``, ``b: n d`` -> boolean ``n n`` mask of valid pairs with cosine >= threshold
    (strict upper triangle when a and b are the same block) and the scores."""
    s = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    ia = jnp.arange(a.shape[0])[:, None]
    ib = jnp.arange(b.shape[0])[None, :]
    keep = (s >= threshold) & (ia < valid_a) & (ib < valid_b)
    if same:
        keep &= ib > ia
    return keep, s


def duplicate_pairs(blocks: list[tuple[np.ndarray, int, int]] | Iterable, threshold: float,
                    load_block=None, num_blocks: Optional[int] = None) -> np.ndarray:
    """All pairs ``(i, j, cosine)`` with ``i < j`` and cosine >= ``threshold``.

    ``load_block(b) -> (block, valid, offset)`` returns block ``b`` of ``num_blocks`` (each
    ``block_rows x d``), so only two blocks are resident at a time: the cost is ``num_blocks^2 / 2``
    block products, exact. Returns an ``m x 3`` float64 array sorted by descending cosine.
    """
    if load_block is None:
        blocks = list(blocks)
        num_blocks = len(blocks)
        load_block = blocks.__getitem__
    out = []
    thr = np.float32(threshold)
    for bi in range(num_blocks):
        a, va, oa = load_block(bi)
        ja = jnp.asarray(a)
        for bj in range(bi, num_blocks):
            b, vb, ob = (a, va, oa) if bj == bi else load_block(bj)
            keep, s = _pair_scores(ja, ja if bj == bi else jnp.asarray(b), np.int32(va), np.int32(vb), thr,
                                   same=bj == bi)
            keep = np.asarray(keep)
            ii, jj = np.nonzero(keep)
            if len(ii):
                sc = np.asarray(s)[ii, jj]
                out.append(np.stack([ii + oa, jj + ob, sc.astype(np.float64)], axis=1))
    if not out:
        return np.zeros((0, 3), np.float64)
    pairs = np.concatenate(out)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -pairs[:, 2]))
    return pairs[order]


def group_pairs(pairs: np.ndarray, n: int) -> list[list[int]]:
    """Connected components (size >= 2) of the duplicate graph, each sorted, largest first."""
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for i, j, _ in pairs:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for x in sorted({int(v) for v in pairs[:, :2].reshape(-1)}):
        groups.setdefault(find(x), []).append(x)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
