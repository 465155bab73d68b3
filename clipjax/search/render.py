"""Search and dedup results as a text table, JSON, or a self-contained HTML gallery."""
from __future__ import annotations

import base64
import html
import json
from typing import Optional

import numpy as np


def _short(text: Optional[str], width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def table(result) -> str:
    out = []
    for query, rows in zip(result.queries, result.rows):
        out.append(f"query: {query}")
        out.append(f"{'rank':>4}  {'score':>7}  {'row':>7}  {'id':<40}  caption")
        for r, row in enumerate(rows, 1):
            out.append(f"{r:>4}  {row['score']:>7.4f}  {row['row']:>7}  {_short(row['id'], 40):<40}  "
                       f"{_short(row.get('caption'), 60)}")
        out.append("")
    return "\n".join(out)


def to_json(result) -> str:
    return json.dumps(result.to_json(), indent=2, ensure_ascii=False)


def _thumb_uri(row: dict, size: int) -> Optional[str]:
    """A data: URI thumbnail of an index row's image (file, or record of a shard), or None."""
    from clipjax.search.encoder import decode_image_bytes, thumbnail_png
    try:
        if "record" in row:
            from clipjax.data.sources import ShardsSource, parse_tf_example
            data = parse_tf_example(ShardsSource([row["path"]]).read_record(int(row["record"])))[0]
        else:
            with open(row["path"], "rb") as f:
                data = f.read()
        png = thumbnail_png(decode_image_bytes(data), size)
    except Exception:  # a file moved or deleted since indexing: show the row without a picture
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = """body{font-family:sans-serif;margin:1em}h2{font-size:1.1em;margin-top:1.5em}
.g{display:flex;flex-wrap:wrap;gap:8px}.c{width:%dpx;font-size:11px;word-break:break-all}
.c img{width:%dpx;height:%dpx;object-fit:contain;background:#eee;image-rendering:pixelated}
.m{width:%dpx;height:%dpx;background:#ddd;display:flex;align-items:center;justify-content:center}"""


def _card(row: dict, size: int, label: str) -> str:
    uri = _thumb_uri(row, size)
    pic = f'<img src="{uri}" alt="">' if uri else f'<div class="m">missing</div>'
    cap = f"<br>{html.escape(_short(row.get('caption'), 80))}" if row.get("caption") else ""
    return (f'<div class="c" title="{html.escape(row.get("path", ""))}">{pic}<br>{html.escape(label)}'
            f"<br>{html.escape(_short(row['id'], 60))}{cap}</div>")


def _page(title: str, sections: list[tuple[str, list[str]]], size: int) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2><div class=\"g\">{''.join(cards)}</div>" for h, cards in sections)
    style = _STYLE % (size, size, size, size, size)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def gallery(result, title: str = "clipjax search", size: int = 128) -> str:
    sections = []
    for query, rows in zip(result.queries, result.rows):
        cards = [_card(r, size, f"#{i} {r['score']:.3f}") for i, r in enumerate(rows, 1)]
        sections.append((f"query: {query}", cards))
    return _page(title, sections, size)


def dedup_table(index, pairs: np.ndarray, groups: list, limit: int = 50) -> str:
    out = [f"{len(pairs)} near-duplicate pairs in {len(groups)} groups"]
    for g in groups[:limit]:
        more = f", ... {len(g) - 8} more" if len(g) > 8 else ""
        out.append(f"group of {len(g)}: " + ", ".join(index.row(i)["id"] for i in g[:8]) + more)
    if len(groups) > limit:
        out.append(f"... {len(groups) - limit} more groups (use --format=json for all)")
    return "\n".join(out)


def dedup_json(index, pairs: np.ndarray, groups: list) -> str:
    return json.dumps({
        "pairs": [{"a": index.row(int(i))["id"], "b": index.row(int(j))["id"], "row_a": int(i), "row_b": int(j),
                   "score": round(float(s), 6)} for i, j, s in pairs],
        "groups": [[index.row(i)["id"] for i in g] for g in groups],
    }, indent=2, ensure_ascii=False)


def dedup_gallery(index, pairs: np.ndarray, groups: list, size: int = 128, limit: int = 200) -> str:
    sections = [(f"group of {len(g)}", [_card(index.row(i), size, f"row {i}") for i in g]) for g in groups[:limit]]
    return _page(f"clipjax dedup: {len(pairs)} pairs, {len(groups)} groups", sections, size)
