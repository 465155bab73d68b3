"""Multimodal search: embed an image collection with a CLIP, store it, query it by text or image.

::

    from clipjax.search import Index
    index = Index.build("photos/", "photos.idx", weights="ViT-B-32.pt", model="ViT-B-32")
    index = Index.open("photos.idx")                        # later; reloads the model on demand
    result = index.search(texts=["a red circle"], k=10)     # or images=[...], or q x d embeddings
    result.rows[0][0]  # {'id': 'a/b.png', 'path': ..., 'caption': ..., 'row': 17, 'score': 0.31}
    pairs, groups = index.dedup(threshold=0.95)             # near-duplicates, exact, chunked

CLI: ``python -m clipjax.search {index,query,dedup}`` (see :mod:`clipjax.search.cli`); the on-disk
format is described in :mod:`clipjax.search.store` and docs/search.md.
"""
from clipjax.search.approx import ApproximateUnavailable, HNSWParams
from clipjax.search.encoder import Encoder, SearchError, load_encoder
from clipjax.search.store import BuildReport, Index, SearchResult

__all__ = ["Index", "SearchResult", "BuildReport", "Encoder", "load_encoder", "SearchError",
           "ApproximateUnavailable", "HNSWParams", "run"]


def run() -> None:
    """Console entry point ``clipjax-search`` (= ``python -m clipjax.search``)."""
    from clipjax.search import cli
    cli.run()
