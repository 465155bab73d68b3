"""Attention masks for the DALL-E transformer over the sequence ``[text tokens | image tokens]``.

A mask is a numpy bool array ``q k`` (True = the query may attend to the key) over ``L = T + H*W``
positions: ``T`` text positions, then the ``H x W`` image grid in raster order (image position
``T + r * W + c`` holds the token at row ``r``, column ``c``). Every mask kind shares two rules:

* text -> text is the standard causal mask, and text never sees image positions;
* every image position sees every text position.

They differ in the image -> image block. For an image query at raster index ``i = r * W + c``
and an image key at raster index ``j = r' * W + c'`` (always ``j <= i``: causal):

``dense``
    every earlier image position (``j <= i``).
``row``
    the previous ``W`` positions and itself: ``i - W <= j <= i``. On the grid this is the row so
    far (``r' = r, c' <= c``) plus the end of the previous row from the query's own column on
    (``r' = r - 1, c' >= c``). This is the Sparse Transformer's (Child et al. 2019) "strided"
    local head with stride ``W``, which DALL-E says it follows; it is also what the paper's
    Figure 11(a) draws (a band of ``W + 1`` positions). Unlike a purely axial row mask, the band
    reaches into the previous row, so row and column layers together see every earlier token.
``column``
    the positions a multiple of ``W`` back: ``(i - j) % W == 0``, i.e. the same column, rows
    ``r' <= r``. The paper draws its column layers on the *transposed* image grid (Figure
    11(b)); we keep raster order and use the equivalent strided mask on it (the Sparse
    Transformer's second head), so that sampling order is the same in every layer.
``conv``
    the already generated cells of the ``kernel x kernel`` neighbourhood centred on the query
    (``|r' - r| <= kernel // 2``, ``|c' - c| <= kernel // 2``, ``j <= i``); no wrap-around at the
    grid border. The paper uses ``kernel = 11``.

Layer schedule (paper, appendix B.1): with 1-based layer index ``i`` in ``[1, 63]`` a layer uses
column attention if ``(i - 2) % 4 == 0`` and row attention otherwise ("row, column, row, row,
..."); the last (64th) layer uses the convolutional mask. :func:`dalle_schedule` applies the
same rule to any depth: the last layer is ``conv`` and layer ``i`` (1-based) before it is
``column`` iff ``(i - 2) % 4 == 0``. In 0-based indices ``l``: ``column`` iff ``(l - 1) % 4 == 0``.

For the shared :class:`clipjax.models.layers.Transformer` use :func:`layer_masks`, which returns
``layer_types`` (a tuple of ``num_layers`` ints) and ``masks: n_types q k``, every distinct mask
built once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["KINDS", "attention_mask", "dalle_schedule", "resolve_schedule", "layer_masks"]

KINDS = ("dense", "row", "column", "conv")


def _check_grid(text_len: int, grid_h: int, grid_w: int) -> None:
    if text_len < 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"mask geometry must have text_len >= 0 and a positive image grid, got "
                         f"text_len={text_len}, grid={grid_h}x{grid_w}.")


def attention_mask(kind: str, text_len: int, grid_h: int, grid_w: int, kernel: int = 11) -> np.ndarray:
    """The ``q k`` bool mask of ``kind`` (see module docstring) over ``text_len + grid_h * grid_w``
    positions."""
    if kind not in KINDS:
        raise ValueError(f"Unknown attention mask kind {kind!r}; use one of {KINDS}.")
    _check_grid(text_len, grid_h, grid_w)
    if kind == "conv" and (kernel < 1 or kernel % 2 == 0):
        raise ValueError(f"conv attention needs an odd positive kernel size, got {kernel}; the paper uses 11.")
    n = grid_h * grid_w
    length = text_len + n
    mask = np.tril(np.ones((length, length), dtype=bool))   # causal everywhere, text -> text included
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    causal = j <= i
    if kind == "dense":
        image = causal
    elif kind == "row":
        image = causal & (i - j <= grid_w)
    elif kind == "column":
        image = causal & ((i - j) % grid_w == 0)
    else:
        half = kernel // 2
        dr = np.abs(i // grid_w - j // grid_w)
        dc = np.abs(i % grid_w - j % grid_w)
        image = causal & (dr <= half) & (dc <= half)
    mask[text_len:, text_len:] = image
    return mask


def dalle_schedule(num_layers: int) -> tuple[str, ...]:
    """The paper's per-layer mask kinds for a ``num_layers`` deep model (see module docstring)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, num_layers)]
    return tuple(kinds + ["conv"])


def resolve_schedule(schedule: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """``schedule`` may be ``'dalle'`` (the paper's), a single kind (``'dense'``, ``'row'``, ...) used
    by every layer, a comma-separated string or a sequence of kinds: a sequence shorter than
    ``num_layers`` is cycled (``'row,column'`` alternates)."""
    if isinstance(schedule, str):
        if schedule == "dalle":
            return dalle_schedule(num_layers)
        schedule = [s.strip() for s in schedule.split(",") if s.strip()]
    kinds = tuple(schedule)
    if not kinds:
        raise ValueError("attention schedule is empty; use 'dalle', 'dense' or a list of kinds.")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"attention schedule has unknown kinds {bad}; use 'dalle' or kinds from {KINDS}.")
    if len(kinds) > num_layers:
        raise ValueError(f"attention schedule lists {len(kinds)} kinds for num_layers={num_layers}.")
    return tuple(kinds[i % len(kinds)] for i in range(num_layers))


def layer_masks(schedule: str | Sequence[str], num_layers: int, text_len: int, grid_h: int, grid_w: int,
                kernel: int = 11) -> tuple[tuple[int, ...], np.ndarray]:
    """``(layer_types, masks)`` for :class:`clipjax.models.layers.Transformer`.

    ``layer_types[l]`` indexes ``masks: n_types q k`` (bool), which holds each distinct kind of the
    schedule once, in order of first use.
    """
    kinds = resolve_schedule(schedule, num_layers)
    distinct = list(dict.fromkeys(kinds))
    masks = np.stack([attention_mask(k, text_len, grid_h, grid_w, kernel) for k in distinct])
    return tuple(distinct.index(k) for k in kinds), masks
