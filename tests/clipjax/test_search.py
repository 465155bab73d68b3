"""clipjax.search: exact top-k and dedup kernels, the on-disk index (resume, bad files, workers,
shards), text/image queries with a briefly trained tiny CLIP, approximate search, and the CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipjax.data.builtin import SHAPE_COLOURS, SHAPE_NAMES, DigitsSource, render_shape, shape_attributes
from clipjax.search import ApproximateUnavailable, Index, SearchError, exact, load_encoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLOURS = list(SHAPE_COLOURS)
SHAPES_TEST_START = 8640  # ShapesSource('test') indices: disjoint from what the model trained on


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_collection(folder, n_shapes, n_digits, start=SHAPES_TEST_START):
    os.makedirs(os.path.join(folder, "shapes"), exist_ok=True)
    os.makedirs(os.path.join(folder, "digits"), exist_ok=True)
    truth = {}
    for i in range(start, start + n_shapes):
        rel = f"shapes/{i:05d}.png"
        Image.fromarray(render_shape(i, 32)).save(os.path.join(folder, rel))
        truth[rel] = shape_attributes(i)
    digits = DigitsSource("test", 32)
    for i in range(n_digits):
        rel = f"digits/{i:04d}.png"
        Image.fromarray(digits.images[i]).save(os.path.join(folder, rel))
        truth[rel] = {"digit": int(digits.labels[i])}
    return truth


# ---- kernels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block,k", [(1000, 256, 10), (37, 64, 5), (300, 100, 40), (5, 64, 8)])
def test_exact_topk_matches_brute_force(n, block, k):
    rng = np.random.default_rng(n)
    x, q = _unit(rng, n, 24), _unit(rng, 7, 24)
    # uneven chunk files, as on disk
    cuts = sorted(rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False)) if n > 3 else []
    scores, ids = exact.topk(q, np.split(x, cuts), k, block_rows=block)
    ref = q @ x.T
    kk = min(k, n)
    want = np.argsort(-ref, axis=1, kind="stable")[:, :kk]
    np.testing.assert_array_equal(ids[:, :kk], want)
    np.testing.assert_allclose(scores[:, :kk], np.take_along_axis(ref, want, 1), atol=1e-5)
    assert np.all(ids[:, kk:] == -1) and np.all(np.isneginf(scores[:, kk:]))


def test_iter_blocks_regroups_rows_in_order():
    arrays = [np.full((n, 2), i, np.float32) for i, n in enumerate([3, 0, 5, 1])]
    blocks = list(exact.iter_blocks(arrays, 4))
    assert [(v, o) for _, v, o in blocks] == [(4, 0), (4, 4), (1, 8)]
    got = np.concatenate([b[:v] for b, v, _ in blocks])
    np.testing.assert_array_equal(got, np.concatenate(arrays))
    assert np.all(blocks[-1][0][1:] == 0)


def test_even_block_rows():
    assert exact.even_block_rows(100_000, 65536) == 50176     # 2 blocks, not 65536 + 34464
    assert exact.even_block_rows(5, 65536) == 1024
    assert exact.even_block_rows(131072, 65536) == 65536
    for n in (1, 999, 4097, 300_001):
        b = exact.even_block_rows(n, 4096)
        assert b <= 4096 and b % 1024 == 0 and -(-n // b) == -(-n // 4096)


def test_index_search_streamed_from_disk_equals_device_cache(tmp_path):
    rng = np.random.default_rng(3)
    index = Index.from_embeddings(str(tmp_path / "v"), _unit(rng, 3000, 16), dtype="float16", chunk_rows=700)
    q = _unit(rng, 5, 16)
    cached = index.search(q, k=7, block_rows=1024)
    index.cache_bytes = 0  # larger than the cache: read block by block from the memory-mapped chunks
    index._device_blocks = None
    streamed = index.search(q, k=7, block_rows=1024)
    np.testing.assert_array_equal(cached.ids, streamed.ids)
    ref = q @ index.embeddings().T
    np.testing.assert_array_equal(cached.ids, np.argsort(-ref, axis=1, kind="stable")[:, :7])
    assert [r["id"] for r in cached.rows[0]] == [str(i) for i in cached.ids[0]]


@pytest.mark.parametrize("block", [16, 64])
def test_duplicate_pairs_and_groups_match_brute_force(block):
    rng = np.random.default_rng(1)
    x = _unit(rng, 50, 16)
    x[10] = x[3]                                        # exact duplicate
    x[40] = x[3] + 0.01 * rng.standard_normal(16)       # near duplicate of the same image
    x[41] = x[7] + 0.01 * rng.standard_normal(16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blocks = list(exact.iter_blocks([x], block))
    pairs = exact.duplicate_pairs(blocks, 0.99)
    s = x @ x.T
    want = {(i, j) for i in range(50) for j in range(i + 1, 50) if s[i, j] >= 0.99}
    assert {(int(i), int(j)) for i, j, _ in pairs} == want == {(3, 10), (3, 40), (10, 40), (7, 41)}
    assert np.all(np.diff(pairs[:, 2]) <= 0)
    assert exact.group_pairs(pairs, 50) == [[3, 10, 40], [7, 41]]


# ---- index building: bad files, resume, workers (random tiny model: no training needed) --------
@pytest.fixture(scope="module")
def random_encoder():
    return load_encoder(model="tiny-vit")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("collection"))
    _write_collection(root, 20, 10)
    with open(os.path.join(root, "shapes", "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)   # a PNG header, then nothing valid
    open(os.path.join(root, "digits", "empty.jpg"), "wb").close()
    with open(os.path.join(root, "shapes", "08641.txt"), "w") as f:
        f.write("a caption for one shape")
    return root


def test_bad_files_are_skipped_and_listed(folder, random_encoder, tmp_path):
    index = Index.build(folder, str(tmp_path / "idx"), encoder=random_encoder, batch_size=8, chunk_rows=8,
                        dtype="float32", progress=False)
    assert len(index) == 30
    bad = {b["id"]: b["reason"] for b in index.build_report.bad}
    assert bad == {"shapes/corrupt.png": "corrupt_image", "digits/empty.jpg": "empty_file"}
    assert {b["id"]: b["reason"] for b in Index.open(str(tmp_path / "idx")).bad()} == bad
    ids = index.ids()
    assert len(set(ids)) == 30 and "shapes/corrupt.png" not in ids
    emb = index.embeddings()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # the documented layout: chunks/<stamp>.npy (n d) next to chunks/<stamp>.jsonl (n rows)
    chunk_dir = tmp_path / "idx" / "chunks"
    stems = sorted(p.stem for p in chunk_dir.glob("*.jsonl"))
    assert len(stems) == 4 and sorted(p.stem for p in chunk_dir.glob("*.npy")) == stems   # 30 rows / 8
    on_disk = np.concatenate([np.load(chunk_dir / f"{s}.npy") for s in stems])
    assert on_disk.dtype == np.float32 and on_disk.shape == (30, 32)
    np.testing.assert_array_equal(on_disk, emb)
    row = index.row(ids.index("shapes/08641.png"))
    assert row["caption"] == "a caption for one shape" and row["path"] == os.path.join(folder, "shapes", "08641.png")
    # the stored embeddings are the model's: re-embed a few files directly
    sel = [0, 17, 29]
    direct = random_encoder.embed_images([index.row(i)["path"] for i in sel])
    np.testing.assert_allclose(emb[sel], direct, atol=1e-5)


def test_rerun_embeds_only_new_files(folder, random_encoder, tmp_path):
    import shutil
    own = str(tmp_path / "collection")
    shutil.copytree(folder, own)
    out = str(tmp_path / "idx")
    first = Index.build(own, out, encoder=random_encoder, batch_size=8, chunk_rows=16, progress=False)
    before = first.embeddings()
    for i in range(10):
        Image.fromarray(render_shape(20_000 + i, 32)).save(os.path.join(own, "shapes", f"new{i}.png"))
    calls = []
    preprocess = random_encoder.preprocess
    random_encoder.preprocess = lambda img: calls.append(1) or preprocess(img)
    try:
        second = Index.build(own, out, encoder=random_encoder, batch_size=8, chunk_rows=16, progress=False)
    finally:
        random_encoder.preprocess = preprocess
    r = second.build_report
    assert (r.embedded, r.already, len(r.bad)) == (10, 30, 2)
    assert len(calls) == 10                      # only the new files were decoded and embedded
    assert len(second) == 40 and len(set(second.ids())) == 40
    np.testing.assert_array_equal(second.embeddings(0, 30), before)   # old rows untouched
    assert sorted(second.ids()[30:]) == sorted(f"shapes/new{i}.png" for i in range(10))
    # a third run finds nothing to do (the bad files are retried and still listed)
    third = Index.build(own, out, encoder=random_encoder, progress=False)
    assert (third.build_report.embedded, third.build_report.already, len(third)) == (0, 40, 40)
    assert len(third.bad()) == 2
    with pytest.raises(SearchError, match="different source"):
        Index.build(folder, out, encoder=random_encoder, progress=False)  # another folder: refused


def test_interrupted_build_resumes_without_duplicates(folder, random_encoder, tmp_path):
    out = str(tmp_path / "idx")
    preprocess, count = random_encoder.preprocess, [0]

    def flaky(img):
        count[0] += 1
        if count[0] > 13:
            raise KeyboardInterrupt  # killed mid-run
        return preprocess(img)
    random_encoder.preprocess = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            Index.build(folder, out, encoder=random_encoder, batch_size=4, chunk_rows=4, progress=False)
    finally:
        random_encoder.preprocess = preprocess
    partial = Index.open(out)
    assert 0 < len(partial) < 30 and len(partial) % 4 == 0   # complete batches were kept
    done = Index.build(folder, out, encoder=random_encoder, batch_size=4, chunk_rows=4, progress=False)
    assert done.build_report.already == len(partial)
    assert len(done) == 30 and len(set(done.ids())) == 30


def test_workers_split_the_collection(folder, random_encoder, tmp_path):
    out = str(tmp_path / "idx")
    a = Index.build(folder, out, encoder=random_encoder, worker_index=0, num_workers=2, progress=False)
    n0 = len(a)
    b = Index.build(folder, out, encoder=random_encoder, worker_index=1, num_workers=2, progress=False)
    assert 0 < n0 < 30 and b.build_report.embedded == 30 - n0
    assert b.build_report.other_workers == n0 + 2 - len(b.build_report.bad)
    assert len(b) == 30 and len(set(b.ids())) == 30
    assert len(b.bad()) == 2  # the two bad files, each listed by the worker that owns it


def test_model_mismatch_and_bad_arguments_are_clear_errors(folder, random_encoder, tmp_path):
    out = str(tmp_path / "idx")
    Index.build(folder, out, encoder=random_encoder, progress=False)
    # the same architecture from another seed stands in for "other weights" (no new compilation)
    other = dataclasses.replace(random_encoder, spec=dict(random_encoder.spec, seed=1))
    with pytest.raises(SearchError, match="different model.*--overwrite"):
        Index.build(folder, out, encoder=other, progress=False)
    rebuilt = Index.build(folder, out, encoder=other, overwrite=True, progress=False)
    assert len(rebuilt) == 30 and rebuilt.meta["model"]["seed"] == 1
    with pytest.raises(SearchError, match="no such folder"):
        Index.build(str(tmp_path / "missing"), out, encoder=other, progress=False)
    with pytest.raises(SearchError, match="not a search index"):
        Index.open(str(tmp_path))
    with pytest.raises(SearchError, match="non-empty folder that is not a search index"):
        Index.build(folder, str(tmp_path), encoder=other, progress=False)   # never writes into it
    with pytest.raises(SearchError, match="q x 32"):
        rebuilt.search(np.ones((2, 7)), k=3)
    with pytest.raises(SearchError, match="exactly one"):
        rebuilt.search(np.ones(32), texts="a red circle")
    with pytest.raises(SearchError, match="no model"):
        load_encoder()


def test_index_from_shards(folder, random_encoder, tmp_path):
    from clipjax.data import shards
    src = str(tmp_path / "captioned")
    os.makedirs(src)
    for i in range(6):
        Image.fromarray(render_shape(i, 32)).save(os.path.join(src, f"{i}.png"))
        with open(os.path.join(src, f"{i}.txt"), "w") as f:
            f.write(f"shape number {i}")
    shards.convert(src, str(tmp_path / "shards"), num_shards=2, log=lambda *a: None)
    index = Index.build(str(tmp_path / "shards"), str(tmp_path / "idx"), encoder=random_encoder,
                        dtype="float32", progress=False)
    assert index.meta["source"]["kind"] == "shards" and len(index) == 6
    rows = list(index.rows())
    assert all("#" in r["id"] and r["path"].endswith(".tfrecord") for r in rows)
    assert sorted(r["caption"] for r in rows) == sorted(f"shape number {i}" for i in range(6))
    # the shard record holds the same picture as the file it came from
    r = next(r for r in rows if r["caption"] == "shape number 4")
    direct = random_encoder.embed_images([os.path.join(src, "4.png")])[0]
    np.testing.assert_allclose(index.embeddings()[rows.index(r)], direct, atol=1e-5)
    from clipjax.search import render
    res = index.search(random_encoder.embed_images([os.path.join(src, "4.png")]), k=2)
    assert render.gallery(res).count("data:image/png;base64,") == 2  # thumbnails read from shards


def test_multi_device_embedding_matches_single_device(tmp_path):
    code = (
        "import numpy as np, jax, sys\n"
        "from clipjax.search import load_encoder\n"
        "assert jax.device_count() == 8\n"
        "enc = load_encoder(model='tiny-vit')\n"
        "x = np.random.default_rng(0).standard_normal((13, 32, 32, 3)).astype(np.float32)\n"
        "np.save(sys.argv[1], enc.embed_preprocessed(x, batch_size=6))\n")
    outs = []
    for n in ("8", "1"):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=n, PYTHONPATH=REPO)
        path = str(tmp_path / f"emb{n}.npy")
        if n == "1":
            code = code.replace("== 8", "== 1")
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env, cwd=REPO, timeout=300)
        outs.append(np.load(path))
    assert outs[0].shape == (13, 32)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# ---- approximate search -----------------------------------------------------------------------
def _vector_index(tmp_path, x):
    return Index.from_embeddings(str(tmp_path / "vectors"), x, dtype="float32", chunk_rows=len(x) // 3 + 1)


def _agreement(ids, truth):
    return np.mean([len(set(a) & set(t)) / truth.shape[1] for a, t in zip(ids, truth)])


def test_approximate_search_agrees_with_exact(tmp_path):
    rng = np.random.default_rng(0)
    centres = _unit(rng, 100, 48)
    x = centres[rng.integers(0, 100, 5000)] + 0.15 * rng.standard_normal((5000, 48)).astype(np.float32)
    index = _vector_index(tmp_path, x / np.linalg.norm(x, axis=1, keepdims=True))
    q = centres[rng.integers(0, 100, 50)] + 0.15 * rng.standard_normal((50, 48)).astype(np.float32)
    ex = index.search(q, k=10)
    ap = index.search(q, k=10, approximate=True)
    assert _agreement(ap.ids, ex.ids) >= 0.95
    # candidates are re-scored with the stored rows: a row found by both has the exact score
    for a_ids, a_s, e_ids, e_s in zip(ap.ids, ap.scores, ex.ids, ex.scores):
        common = set(a_ids) & set(e_ids)
        assert common
        for i in common:
            np.testing.assert_allclose(a_s[list(a_ids).index(i)], e_s[list(e_ids).index(i)], atol=1e-5)
        assert np.all(np.diff(a_s) <= 0)
    info = index.approximate_info()
    cal = info["calibration"]
    assert cal["queries"] == 200 and cal["reached_target"] and cal["recall"] >= 0.97
    assert 0 < cal["fraction_of_rows"] < 0.5  # clustered: the walk scores a small part of the index
    assert info["params"]["expansion_search"] == cal["expansion_search"] == cal["ladder"][-1][0]
    assert info["requested"]["expansion_search"] == 0 and info["build_seconds"] > 0
    assert os.path.exists(os.path.join(index.directory, "approx.usearch"))
    mtime = os.path.getmtime(os.path.join(index.directory, "approx.usearch"))
    again = Index.open(index.directory).search(q, k=10, approximate=True)   # reused, not rebuilt
    np.testing.assert_array_equal(again.ids, ap.ids)
    assert os.path.getmtime(os.path.join(index.directory, "approx.usearch")) == mtime


def test_approximate_search_on_uniform_random_vectors(tmp_path):
    """i.i.d. unit vectors (no neighbourhoods) need a much wider walk than clustered ones; the
    calibration finds it, and fresh queries then agree with exact search."""
    rng = np.random.default_rng(1)
    index = _vector_index(tmp_path, _unit(rng, 5000, 128))
    q = _unit(rng, 50, 128)
    ex = index.search(q, k=10)
    ap = index.search(q, k=10, approximate=True)
    cal = index.approximate_info()["calibration"]
    assert cal["reached_target"] and cal["expansion_search"] > 48, cal
    clustered_like = Index.from_embeddings(str(tmp_path / "c"), np.repeat(_unit(rng, 50, 128), 100, 0)
                                           + 0.05 * rng.standard_normal((5000, 128)).astype(np.float32))
    assert cal["fraction_of_rows"] > clustered_like.approximate_info()["calibration"]["fraction_of_rows"]
    assert _agreement(ap.ids, ex.ids) >= 0.95
    # a walk of 40 (the candidates, narrower than calibrated) finds fewer of the true neighbours
    narrow = index.search(q, k=10, approximate=True, expansion_search=40)
    assert _agreement(narrow.ids, ex.ids) < _agreement(ap.ids, ex.ids)


def test_approximate_search_on_vectors_sharing_a_direction(tmp_path):
    """Real embeddings share a large common direction (all pairwise cosines high); the graph
    centres rows before quantising them to int8, so it still tells them apart."""
    rng = np.random.default_rng(3)
    common, centres = _unit(rng, 1, 64), _unit(rng, 50, 64)

    def draw(n):
        v = 6 * common + 0.6 * centres[rng.integers(0, 50, n)] + 0.06 * rng.standard_normal((n, 64))
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    index = _vector_index(tmp_path, draw(3000))
    q = draw(40)
    ex = index.search(q, k=10)
    assert (q @ index.embeddings().T).min() > 0.95  # every cosine
    ap = index.search(q, k=10, approximate=True, oversample=1)  # no slack: the graph's own order
    assert _agreement(ap.ids, ex.ids) >= 0.93  # measured 0.97 (uncentred int8: 0.77)


def test_approximate_index_settings_rebuild_and_errors(tmp_path):
    from clipjax.search import HNSWParams
    from clipjax.search import approx
    rng = np.random.default_rng(2)
    index = _vector_index(tmp_path, _unit(rng, 1200, 16))
    q = _unit(rng, 5, 16)
    ex = index.search(q, k=5)
    path = os.path.join(index.directory, "approx.json")
    fixed = HNSWParams(connectivity=8, expansion_add=32, expansion_search=200, quantization="f16", oversample=2)
    graph, used = index.approximate_index(fixed)
    assert used == fixed and graph.quantization == "f16" and "f16" in str(graph.index.dtype).lower()
    info = index.approximate_info()  # a fixed width is still measured on held-out rows
    assert info["calibration"]["ladder"] == [[200, info["calibration"]["recall"]]]
    assert _agreement(index.search(q, k=5, approximate=True).ids, ex.ids) >= 0.8
    # the same settings reuse the saved graph; different ones rebuild it
    reopened = Index.open(index.directory)
    assert reopened.approximate_index(fixed)[1] == fixed
    _, used = reopened.approximate_index(HNSWParams(connectivity=8, expansion_add=32, calibration_queries=50))
    assert used.expansion_search > 0 and reopened.approximate_info()["calibration"]["queries"] == 50
    # an approx.json from an older version is rebuilt, not misread
    with open(path) as f:
        meta = json.load(f)
    meta["format"] = "clipjax-approx-v1"
    with open(path, "w") as f:
        json.dump(meta, f)
    assert Index.open(index.directory).approximate_info()["format"] == approx.FORMAT
    with pytest.raises(SearchError, match=r"connectivity=1 .*quantization='i4' \(use one of i8, f16, f32\)"):
        index.approximate_index(HNSWParams(connectivity=1, quantization="i4"))
    with pytest.raises(SearchError, match="calibration_queries >= 1"):
        HNSWParams(calibration_queries=0).validate()
    with pytest.raises(SearchError, match="oversample=0: use >= 1"):
        index.search(q, k=5, approximate=True, oversample=0)
    # a tiny index is not calibrated: the walk covers all of it
    small = Index.from_embeddings(str(tmp_path / "small"), _unit(rng, 300, 16), dtype="float32")
    res = small.search(q, k=5, approximate=True)
    np.testing.assert_array_equal(res.ids, small.search(q, k=5).ids)
    assert small.approximate_info()["calibration"]["expansion_search"] == 300


def test_approximate_without_usearch_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_usearch(name, *args, **kwargs):
        if name.startswith("usearch"):
            raise ImportError("No module named 'usearch'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_usearch)
    index = _vector_index(tmp_path, _unit(np.random.default_rng(0), 20, 8))
    with pytest.raises(ApproximateUnavailable, match=r"pip install clipjax\[search\]"):
        index.search(np.ones(8), k=3, approximate=True)
    assert index.search(np.ones(8), k=3).ids.shape == (1, 3)  # exact search still works
    with pytest.raises(SearchError, match="precomputed embeddings"):
        index.search(texts="a red circle")


# ---- a briefly trained tiny CLIP: text and image queries retrieve the right images -------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny CLIP trained ~1 minute on the shapes dataset with the real trainer (checkpoint in workdir)."""
    import ml_collections
    from clipjax import trainer
    from configs.clip import digits_tiny
    config = digits_tiny.get_config()
    config.data.source = "shapes"
    config.batch_size = 64
    config.total_steps = 150
    config.optim.warmup_steps = 20
    config.eval = ml_collections.ConfigDict(dict(config.eval.to_dict(), zero_shot=False, retrieval=False,
                                                 linear_probe=False))
    config.train.progress_bar = False
    config.train.log_every = 1000
    config.checkpoint.every_steps = 1000
    config.checkpoint.async_save = False
    config.count_flops = False
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.train(trainer.load_task(config), config, workdir)
    return config, workdir


@pytest.fixture(scope="module")
def trained_index(trained_run, tmp_path_factory):
    config, workdir = trained_run
    root = str(tmp_path_factory.mktemp("shapes_digits"))
    truth = _write_collection(root, 192, 40)
    open(os.path.join(root, "shapes", "zz_corrupt.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not a jpeg")
    out = str(tmp_path_factory.mktemp("index"))
    index = Index.build(root, out, config=config, workdir=workdir, progress=False)
    return index, truth, root


@pytest.mark.slow
def test_text_queries_retrieve_matching_shapes(trained_index):
    index, truth, _ = trained_index
    combos = [(c, s) for c in range(len(COLOURS)) for s in range(len(SHAPE_NAMES))]
    res = index.search(texts=[f"a {COLOURS[c]} {SHAPE_NAMES[s]}" for c, s in combos], k=10)
    colour = np.mean([[truth[r["id"]].get("colour") == c for r in rows] for (c, _), rows in zip(combos, res.rows)])
    both = np.mean([[truth[r["id"]].get("colour") == c and truth[r["id"]].get("shape") == s for r in rows]
                    for (c, s), rows in zip(combos, res.rows)])
    print(f"precision@10: colour {colour:.3f}, colour+shape {both:.3f}")
    # 192 shapes (each colour 24 times, each colour+shape 4 times) + 40 digits
    assert colour >= 0.7, colour           # chance 24 / 232 = 0.10
    assert both >= 4 * (4 / 232), both     # chance 0.017 (and at most 0.4: 4 matches per query)
    assert len(index.build_report.bad) == 1


@pytest.mark.slow
def test_image_queries_return_themselves_first(trained_index):
    index, _, root = trained_index
    ids = index.ids()
    sel = list(range(0, len(ids), 9))
    res = index.search(images=[os.path.join(root, ids[i]) for i in sel], k=3)
    assert [rows[0]["row"] for rows in res.rows] == sel
    assert all(rows[0]["score"] > 0.99 for rows in res.rows)  # float16 storage


@pytest.mark.slow
def test_workdir_index_is_self_contained(trained_index):
    index, _, _ = trained_index
    spec = index.meta["model"]
    assert spec["kind"] == "workdir" and spec["step"] == 150
    assert spec["weights"] == os.path.join(index.directory, "model.msgpack") and os.path.exists(spec["weights"])
    reopened = Index.open(index.directory)   # reloads the exported model from index.json
    a = reopened.search(texts="a red circle", k=5)
    b = index.search(texts="a red circle", k=5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


# ---- CLI ---------------------------------------------------------------------------------------
def _cli(*args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "clipjax.search", *args], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    if check and p.returncode:
        raise AssertionError(f"exit {p.returncode}: {p.stderr[-2000:]}")
    return p


def test_cli_index_query_dedup(folder, tmp_path):
    out = str(tmp_path / "idx")
    p = _cli("index", f"--images={folder}", "--model=tiny-vit", f"--out={out}", "--noprogress")
    assert "embedded 30 new" in p.stdout and "2 bad" in p.stdout and "corrupt_image" in p.stdout
    target = os.path.join(folder, "shapes", "08645.png")
    p = _cli("query", out, f"--image={target}", "--top-k=3", "--format=json")
    results = json.loads(p.stdout)
    assert results[0]["query"] == target and len(results[0]["results"]) == 3
    assert [r["rank"] for r in results[0]["results"]] == [1, 2, 3]
    p = _cli("query", out, f"--image={target}", "--top-k=3", "--format=json", "--approx", "--oversample=2",
             "--expansion-search=64")
    approx_results = json.loads(p.stdout)[0]["results"]  # 30 rows: the graph walk covers them all
    assert [(r["id"], round(r["score"], 4)) for r in approx_results] == \
        [(r["id"], round(r["score"], 4)) for r in results[0]["results"]]
    p = _cli("query", out, f"--image={target}", "--approx", "--oversample=-1", check=False)
    assert p.returncode != 0 and "--oversample=-1: use 0" in p.stderr and "Traceback" not in p.stderr
    html = str(tmp_path / "r.html")
    _cli("query", out, "--text=a red circle", "--text=a blue square", "--format=html", f"--output={html}")
    page = open(html).read()
    assert page.count("<h2>") == 2 and page.count("data:image/png;base64,") == 20
    p = _cli("dedup", out, "--threshold=1.01", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "threshold" in p.stderr
    p = _cli("query", str(tmp_path / "nope"), "--text=x", check=False)
    assert p.returncode == 2 and "not a search index" in p.stderr and "Traceback" not in p.stderr
