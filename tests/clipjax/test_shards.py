"""The shards CLI on a folder with bad inputs, and reading its output back."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipjax.data import sources
from clipjax.data.shards import convert

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write(folder, name, data, caption):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    if caption is not None:
        stem = os.path.splitext(name)[0]
        with open(os.path.join(folder, stem + ".txt"), "wb") as f:
            f.write(caption if isinstance(caption, bytes) else caption.encode("utf-8"))


GOOD = ["good0", "good1", "good2", "good3", "sub/good4", "palette", "grey16", "cmyk", "alpha", "longcap"]
BAD = {"corrupt": "corrupt_image", "truncated": "corrupt_image", "zerobyte": "empty_file",
       "emptycap": "empty_caption", "nonutf8": "caption_not_utf8", "nocap": "missing_caption"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("imgs"))
    os.makedirs(os.path.join(d, "sub"))
    rng = np.random.default_rng(0)
    for i, name in enumerate(["good0", "good1", "good2", "good3", "sub/good4"]):
        arr = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
        _write(d, name + ".jpg", _jpeg(arr), f"a photo number {i} ñ 猫")
    _write(d, "palette.png", _png(Image.new("RGB", (16, 12), (10, 200, 30)).convert("P")), "a green patch")
    grey16 = Image.fromarray(np.full((10, 10), 40000, np.uint16))
    _write(d, "grey16.png", _png(grey16), "a grey square")
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    _write(d, "cmyk.jpg", buf.getvalue(), "a red square in cmyk")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 2] = 255  # blue, left half opaque, right half fully transparent
    rgba[:, :4, 3] = 255
    _write(d, "alpha.png", _png(Image.fromarray(rgba, "RGBA")), "half blue")
    _write(d, "longcap.jpg", _jpeg(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)), "word " * 1000)
    # bad ones
    _write(d, "corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)), "corrupt")
    full = _jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _write(d, "truncated.jpg", full[: len(full) // 2], "truncated")
    _write(d, "zerobyte.jpg", b"", "zero bytes")
    _write(d, "emptycap.jpg", _jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), "  \n ")
    _write(d, "nonutf8.jpg", _jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), b"caf\xe9 \xff\xfe")
    _write(d, "nocap.jpg", _jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), None)
    with open(os.path.join(d, "notes.md"), "w") as f:
        f.write("not an image, ignored")
    return d


@pytest.fixture(scope="module")
def cli_out(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "clipjax.data.shards", "--input", folder, "--output", out,
                           "--num_shards", "3"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_report_counts_bad_rows_by_reason(cli_out):
    out, stdout = cli_out
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["rows"] == len(GOOD) + len(BAD)
    assert report["written"] == len(GOOD)
    expected = {}
    for reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"] == expected
    assert {r["key"].split(".")[0]: r["reason"] for r in report["skipped_examples"]} == BAD
    # converted (not skipped): CMYK, alpha, palette, 16-bit
    for what in ("cmyk", "alpha", "palette", "16bit"):
        assert report["converted"].get(what) == 1, report["converted"]
    assert report["captions_truncated"] == 1
    assert '"written": %d' % len(GOOD) in stdout  # printed too
    assert sum(s["num_records"] for s in report["shards"]) == len(GOOD)
    assert max(s["num_records"] for s in report["shards"]) - min(s["num_records"] for s in report["shards"]) <= 1


def test_all_good_rows_present_and_decodable_by_tf(cli_out):
    import tensorflow as tf
    out, _ = cli_out
    src = sources.ShardsSource(out)
    assert len(src) == len(GOOD) and len(src.files) == 3
    by_key = {}
    for i in range(len(src)):
        ex = src.get(i)
        img = tf.io.decode_image(ex.image, channels=3, expand_animations=False).numpy()
        by_key[os.path.splitext(ex.key)[0]] = (img, ex.captions)
    assert sorted(by_key) == sorted(GOOD)
    assert by_key["good2"][1] == ["a photo number 2 ñ 猫"]
    assert by_key["good2"][0].shape == (22, 30, 3)
    red = by_key["cmyk"][0].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    alpha = by_key["alpha"][0].astype(int)
    assert np.abs(alpha[:, :4] - [0, 0, 255]).max() == 0  # opaque blue, lossless PNG re-encode
    assert np.abs(alpha[:, 4:] - 255).max() == 0           # transparent -> white
    grey = by_key["grey16"][0]
    assert abs(int(grey.mean()) - round(40000 / 65535 * 255)) <= 2
    assert len(by_key["longcap"][1][0]) == sources.MAX_CAPTION_CHARS


def test_offsets_index_matches_scan(cli_out):
    out, _ = cli_out
    src = sources.ShardsSource(out)
    for fname, offs in zip(src.files, src.offsets):
        np.testing.assert_array_equal(offs, sources.scan_offsets(fname))


def test_host_subsets_are_disjoint_files(cli_out):
    out, _ = cli_out
    src = sources.ShardsSource(out)
    a, mode = src.for_process(0, 2)
    b, _ = src.for_process(1, 2)
    assert mode == "local"
    assert set(a.files).isdisjoint(b.files) and len(a) + len(b) == len(src)
    with pytest.raises(sources.DataError, match="num_shards"):
        src.for_process(0, 4)


def test_manifest_with_missing_file_and_clear_error_when_nothing_valid(folder, tmp_path):
    import csv
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        w.writerow([os.path.join(folder, "good0.jpg"), "first", 3])
        w.writerow(["does/not/exist.jpg", "gone", 1])
        w.writerow([os.path.join(folder, "cmyk.jpg"), "red", 0])
    report = convert(str(manifest), str(tmp_path / "o1"), num_shards=2, log=lambda *a: None)
    assert report["written"] == 2 and report["skipped"] == {"missing_file": 1}
    src = sources.ShardsSource(str(tmp_path / "o1"))
    assert sorted(src.get(i).label for i in range(2)) == [0, 3]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": "nope.jpg", "caption": "x"}) + "\n" + "{broken json\n")
    with pytest.raises(sources.DataError, match="none of the 2 rows is usable"):
        convert(str(bad), str(tmp_path / "o2"), num_shards=1, log=lambda *a: None)
    with open(tmp_path / "o2" / "report.json") as f:
        assert json.load(f)["skipped"] == {"bad_manifest_row": 1, "missing_file": 1}


def test_huge_image_skipped(tmp_path):
    d = tmp_path / "huge"
    d.mkdir()
    _write(str(d), "big.png", _png(Image.new("RGB", (300, 200))), "big")
    _write(str(d), "ok.png", _png(Image.new("RGB", (10, 10))), "ok")
    report = convert(str(d), str(tmp_path / "o"), num_shards=1, max_pixels=50_000, log=lambda *a: None)
    assert report["skipped"] == {"image_too_large": 1} and report["written"] == 1


def test_max_side_downscales(tmp_path):
    d = tmp_path / "side"
    d.mkdir()
    _write(str(d), "wide.jpg", _jpeg(np.zeros((100, 300, 3), np.uint8)), "wide")
    convert(str(d), str(tmp_path / "o"), num_shards=1, max_side=50, log=lambda *a: None)
    ex = sources.ShardsSource(str(tmp_path / "o")).get(0)
    assert Image.open(io.BytesIO(ex.image)).size == (150, 50)
