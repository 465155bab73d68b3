"""dallejax.masks against independent brute-force definitions on the (row, column) grid."""
import itertools

import numpy as np
import pytest

from dallejax import masks

GRIDS = [(1, 1), (1, 4), (3, 1), (2, 3), (3, 2), (4, 4), (5, 3)]
TEXT_LENS = [0, 1, 3]


def _brute(kind, text_len, h, w, kernel=11):
    """Position-by-position definition in grid coordinates (no raster-index arithmetic)."""
    n = text_len + h * w

    def where(p):
        if p < text_len:
            return ("text", p)
        r, c = divmod(p - text_len, w)
        return ("image", (r, c))

    m = np.zeros((n, n), bool)
    for q, k in itertools.product(range(n), range(n)):
        (qt, qv), (kt, kv) = where(q), where(k)
        if qt == "text":
            m[q, k] = kt == "text" and k <= q            # text: causal over text, never image
        elif kt == "text":
            m[q, k] = True                                 # image sees all text
        else:
            (r, c), (r2, c2) = qv, kv
            earlier = (r2, c2) <= (r, c)                   # raster order (tuple order = row-major)
            if kind == "dense":
                m[q, k] = earlier
            elif kind == "row":
                # own row up to itself, plus the previous row from the own column rightwards
                m[q, k] = (r2 == r and c2 <= c) or (r2 == r - 1 and c2 >= c)
            elif kind == "column":
                m[q, k] = c2 == c and r2 <= r
            elif kind == "conv":
                m[q, k] = earlier and abs(r2 - r) <= kernel // 2 and abs(c2 - c) <= kernel // 2
    return m


@pytest.mark.parametrize("kind", ["dense", "row", "column"])
@pytest.mark.parametrize("text_len", TEXT_LENS)
@pytest.mark.parametrize("grid", GRIDS)
def test_mask_matches_brute_force(kind, text_len, grid):
    h, w = grid
    got = masks.attention_mask(kind, text_len, h, w)
    assert got.dtype == bool and got.shape == (text_len + h * w,) * 2
    np.testing.assert_array_equal(got, _brute(kind, text_len, h, w))


@pytest.mark.parametrize("kernel", [1, 3, 5, 11])
@pytest.mark.parametrize("text_len", TEXT_LENS)
@pytest.mark.parametrize("grid", GRIDS)
def test_conv_mask_matches_brute_force(kernel, text_len, grid):
    h, w = grid
    np.testing.assert_array_equal(masks.attention_mask("conv", text_len, h, w, kernel),
                                  _brute("conv", text_len, h, w, kernel))


def test_paper_figure_example():
    """Figure 11 geometry: 6 text tokens, a 4x4 grid. Hand-listed image keys for some queries."""
    t = 6
    row = masks.attention_mask("row", t, 4, 4)
    col = masks.attention_mask("column", t, 4, 4)
    conv = masks.attention_mask("conv", t, 4, 4, kernel=3)

    def image_keys(m, i):
        return sorted(np.nonzero(m[t + i, t:])[0].tolist())

    # raster index 7 = (row 1, col 3): own row 4..7 and (0, 3) directly above -> the previous W=4 + itself
    assert image_keys(row, 7) == [3, 4, 5, 6, 7]
    assert image_keys(row, 5) == [1, 2, 3, 4, 5]      # (1,1): (1,0),(1,1) + (0,1),(0,2),(0,3)
    assert image_keys(row, 0) == [0]
    assert image_keys(col, 13) == [1, 5, 9, 13]
    assert image_keys(col, 2) == [2]
    # (2,2) with a 3x3 kernel: (1,1),(1,2),(1,3),(2,1),(2,2)
    assert image_keys(conv, 10) == [5, 6, 7, 9, 10]
    # (1,0): no wrap-around to the end of row 0 on the left
    assert image_keys(conv, 4) == [0, 1, 4]
    for m in (row, col, conv):
        assert m[t:, :t].all(), "every image token attends to all text"
        assert not m[:t, t:].any(), "text never attends to image"
        np.testing.assert_array_equal(m[:t, :t], np.tril(np.ones((t, t), bool)))
        assert not np.triu(m, 1).any(), "causal"
        assert np.diag(m).all(), "every position sees itself"


def test_row_and_column_layers_reach_every_earlier_token():
    """Row then column (the paper's pattern) propagates information from every earlier image token."""
    h = w = 5
    row = masks.attention_mask("row", 2, h, w).astype(int)
    col = masks.attention_mask("column", 2, h, w).astype(int)
    reach = (col @ row) > 0      # query <- column layer <- row layer
    np.testing.assert_array_equal(reach, masks.attention_mask("dense", 2, h, w))


def test_dalle_schedule_follows_paper_rule():
    kinds = masks.dalle_schedule(64)
    assert len(kinds) == 64 and kinds[-1] == "conv"
    assert kinds[:4] == ("row", "column", "row", "row")
    for i in range(1, 64):   # 1-based index of the paper
        assert kinds[i - 1] == ("column" if (i - 2) % 4 == 0 else "row"), i
    assert kinds.count("column") == 16 and kinds.count("conv") == 1
    assert masks.dalle_schedule(1) == ("conv",)


def test_resolve_schedule_and_layer_masks():
    assert masks.resolve_schedule("dense", 3) == ("dense",) * 3
    assert masks.resolve_schedule("row,column", 5) == ("row", "column", "row", "column", "row")
    assert masks.resolve_schedule(("conv",), 2) == ("conv", "conv")
    types, m = masks.layer_masks("dalle", 6, 2, 3, 3, kernel=3)
    assert types == (0, 1, 0, 0, 0, 2)
    assert m.shape == (3, 11, 11) and m.dtype == bool
    for t, kind in zip(types, masks.dalle_schedule(6)):
        np.testing.assert_array_equal(m[t], masks.attention_mask(kind, 2, 3, 3, kernel=3))


@pytest.mark.parametrize("call, match", [
    (lambda: masks.attention_mask("diagonal", 2, 2, 2), "Unknown attention mask kind"),
    (lambda: masks.attention_mask("conv", 2, 2, 2, kernel=4), "odd positive kernel"),
    (lambda: masks.attention_mask("row", 2, 0, 2), "positive image grid"),
    (lambda: masks.resolve_schedule("row,cols", 4), "unknown kinds"),
    (lambda: masks.resolve_schedule(("row",) * 5, 4), "5 kinds for num_layers=4"),
    (lambda: masks.dalle_schedule(0), "num_layers must be >= 1"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
