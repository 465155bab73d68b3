"""clipjax.tokenizer: exact OpenAI CLIP BPE ids, its fast paths, and parity with open_clip."""
import gzip
import importlib.util
import html
import os
import pickle
import subprocess
import sys
import threading
import unicodedata

import ftfy
import numpy as np
import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipjax import tokenizer as tk
from clipjax.tokenizer import Tokenizer, clean_text, ftfy_is_noop, tokenize
from tests.clipjax.data.corpus import captions, mixed_corpus

N_CORPUS = 6000
FAST_ASCII = "\t\n\x0c" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def tok_py():
    return Tokenizer(backend="python")


@pytest.fixture(scope="module")
def corpus():
    texts = mixed_corpus(N_CORPUS, seed=0)
    assert len(set(texts)) == N_CORPUS
    return texts


@pytest.fixture(scope="module")
def corpus_ids(tok, corpus):
    return tok(corpus)


def definition_row(tok, text, length=77):
    """The reference pipeline written out step by step, with none of the shortcuts:
    ftfy always, html.unescape twice, whitespace collapse, lower, regex over the whole text."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip().lower()
    ids = []
    for word in tk._PRETOKENIZE.findall(text):
        ids += tk.Tokenizer._chunk_ids_uncached(tok, word)
    row = [tok.sot_token_id] + ids + [tok.eot_token_id]
    if len(row) > length:
        row = row[:length]
        row[-1] = tok.eot_token_id
    return np.array(row + [0] * (length - len(row)), np.int32)


# ---------------------------------------------------------------------------------------------
# Vocabulary and output format
# ---------------------------------------------------------------------------------------------

def test_vocab_constants(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.context_length == 77
    assert tok.decode([tok.sot_token_id]) == "<start_of_text>"
    assert tok.decode([tok.eot_token_id]) == "<end_of_text>"


def test_known_ids(tok):
    # Ids every CLIP user has seen: "a photo of a cat".
    row = tok("a photo of a cat")[0]
    np.testing.assert_array_equal(row[:7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert not row[7:].any()
    assert tok.encode("A   Photo\tof a CAT") == [320, 1125, 539, 320, 2368]


def test_row_format(tok):
    out = tok(["", "hello world", "x " * 200])
    assert out.dtype == np.int32 and out.shape == (3, 77)
    np.testing.assert_array_equal(out[0, :3], [49406, 49407, 0])
    assert not out[0, 2:].any()
    n = len(tok.encode("hello world"))
    assert out[1, n + 1] == tok.eot_token_id and not out[1, n + 2:].any()
    # Truncation keeps EOT as the last token, no padding left.
    assert out[2, 0] == tok.sot_token_id and out[2, -1] == tok.eot_token_id
    assert (out[2, 1:-1] == tok.encode("x")[0]).all()


@pytest.mark.parametrize("length", [2, 3, 16, 77, 200])
def test_context_length(tok, corpus, length):
    texts = corpus[:300]
    out = tok(texts, context_length=length)
    assert out.shape == (300, length)
    assert (out[:, 0] == tok.sot_token_id).all()
    assert ((out == tok.eot_token_id).sum(1) >= 1).all()
    for i in range(0, 300, 7):
        np.testing.assert_array_equal(out[i], definition_row(tok, texts[i], length))
    assert Tokenizer(context_length=length)(texts[:5]).shape == (5, length)


def test_empty_batch(tok):
    assert tok([]).shape == (0, 77)
    assert tok([], context_length=5).dtype == np.int32


# ---------------------------------------------------------------------------------------------
# The shortcuts are exact: against the written-out definition, without any reference package
# ---------------------------------------------------------------------------------------------

def test_matches_definition_on_corpus(tok, corpus, corpus_ids):
    for i, text in enumerate(corpus):
        np.testing.assert_array_equal(corpus_ids[i], definition_row(tok, text),
                                      err_msg=repr(text))


def test_matches_definition_on_captions(tok):
    texts = captions(3000, seed=1)
    out = tok(texts)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(out[i], definition_row(tok, text), err_msg=repr(text))


def test_batch_composition_does_not_matter(tok, corpus, corpus_ids):
    # Fast (plain ASCII) and careful texts interleaved, alone, or in other batches: same rows.
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(corpus))[:500]
    np.testing.assert_array_equal(tok([corpus[i] for i in idx]), corpus_ids[idx])
    for i in idx[:50]:
        np.testing.assert_array_equal(tok(corpus[i])[0], corpus_ids[i])


def test_backends_agree(tok, tok_py, corpus, corpus_ids):
    assert tok.backend == "rust" and tok_py.backend == "python"
    np.testing.assert_array_equal(tok_py(corpus), corpus_ids)


def test_bpe_merges_are_in_creation_order():
    """The property that makes priority-queue BPE (tokenizers) equal the reference loop:
    every merge's two parts exist before it (single bytes, or made by an earlier merge)."""
    merges = tk._load_merges(tk.DEFAULT_VOCAB_PATH)
    made_at = {}
    for rank, (a, b) in enumerate(merges):
        made_at.setdefault(a + b, rank)
    base = set(tk._BYTE_ORDER) | {c + "</w>" for c in tk._BYTE_ORDER}
    for rank, (a, b) in enumerate(merges):
        for part in (a, b):
            assert part in base or made_at.get(part, rank) < rank, (rank, a, b)


def test_bpe_backends_agree_on_every_merge(tok, tok_py):
    merges = tk._load_merges(tk.DEFAULT_VOCAB_PATH)
    words = {(a + b).removesuffix("</w>") for a, b in merges}
    words |= {w + w for w in list(words)[:5000]}
    for word in sorted(words):
        assert tok._bpe(word) == tok_py._bpe(word), word


def test_ftfy_shortcut_active():
    # If this fails, the installed ftfy changed shape: ids stay exact, but every text pays ftfy.
    assert tk._FTFY_TOUCHED is not None
    assert ftfy_is_noop("a photo of a dog")
    assert ftfy_is_noop("猫がソファーで寝ている") and ftfy_is_noop("café au lait")
    assert not ftfy_is_noop("caf\u00c3\u00a9")     # mojibake
    assert not ftfy_is_noop("Tom &amp; Jerry") and not ftfy_is_noop("it\u2019s")
    assert not ftfy_is_noop("\ufb01ne") and not ftfy_is_noop("a\r\nb")
    assert not ftfy_is_noop("cafe\u0301")          # not NFC


def test_ftfy_noop_is_sound_on_corpus(corpus):
    hits = [t for t in corpus + captions(2000, seed=2) if ftfy_is_noop(t)]
    assert len(hits) > 2000
    for text in hits:
        assert ftfy.fix_text(text) == text, repr(text)


def test_ftfy_noop_is_sound_on_every_bmp_character():
    for cp in range(0x10000):
        c = chr(cp)
        for text in (c, f"a{c}b", f"{c}\n{c}"):
            if ftfy_is_noop(text):
                assert ftfy.fix_text(text) == text, hex(cp)


_FTFY_BAIT = st.sampled_from(
    list("aZ09 .,!'\"-\n\r\t&;#<>") + list("éÃ©â€™Â\xa0\x80\x85\x9d\u2019\u201cﬁＡ\u0301ñ日本😀\ufeff"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(_FTFY_BAIT, max_size=30) | st.text(max_size=30))
def test_ftfy_noop_is_sound_hypothesis(text):
    if ftfy_is_noop(text):
        assert ftfy.fix_text(text) == text


def test_fast_ascii_alphabet_claims():
    """Plain-ASCII texts skip cleaning: check every premise of that, character by character."""
    assert not tk._NOT_FAST_ASCII.search(FAST_ASCII)
    for c in map(chr, range(128)):
        fast = not tk._NOT_FAST_ASCII.search(c) and c != tk._SEP
        assert fast == (c in FAST_ASCII)
        if fast:
            # whitespace for str.split() iff whitespace for the reference regex
            assert c.isspace() == bool(regex.fullmatch(r"\s", c))
            assert ftfy_is_noop(c) and html.unescape(c) == c


def test_ascii_pretokenizer_equals_reference_regex():
    """Chunks that are pure ASCII use the `re` twin of the reference pattern."""
    ascii_chars = [chr(c) for c in range(128)]
    for a in ascii_chars:
        for b in ascii_chars:
            text = a + b
            assert tk._PRETOKENIZE_ASCII.findall(text) == tk._PRETOKENIZE.findall(text), text
    for text in ("<start_of_text>", "<END_OF_TEXT>x", "it's", "IT'S'LL'd", "a'b'c",
                 "<start_of_text<end_of_text>>", "don'T", "''s", "x1y22z"):
        assert tk._PRETOKENIZE_ASCII.findall(text) == tk._PRETOKENIZE.findall(text), text


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(max_codepoint=127), max_size=40))
def test_ascii_pretokenizer_hypothesis(text):
    assert tk._PRETOKENIZE_ASCII.findall(text) == tk._PRETOKENIZE.findall(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.characters(max_codepoint=0x3000) | st.sampled_from(list(FAST_ASCII)),
                        max_size=20), max_size=8))
def test_fast_text_classification(texts):
    expected = [tk._SEP not in t and not tk._NOT_FAST_ASCII.search(t) for t in texts]
    assert tk._fast_texts(texts, tk._SEP.join(texts)).tolist() == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(st.sampled_from(list(FAST_ASCII)), max_size=60), max_size=6))
def test_fast_ascii_path_matches_definition(texts):
    tok = tk.default_tokenizer()
    out = tok(texts)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(out[i], definition_row(tok, text))


def test_cache_replacement(tok, corpus, corpus_ids, monkeypatch):
    fresh = Tokenizer()
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 50)
    first_cache = fresh._cache
    for start in range(0, 600, 100):
        np.testing.assert_array_equal(fresh(corpus[start:start + 100]),
                                      corpus_ids[start:start + 100])
    assert fresh._cache is not first_cache       # it was replaced, not grown without bound


# ---------------------------------------------------------------------------------------------
# API, decode, pickling, threads, errors
# ---------------------------------------------------------------------------------------------

def test_module_tokenize(tok, corpus, corpus_ids):
    np.testing.assert_array_equal(tokenize(corpus[:100]), corpus_ids[:100])
    assert tokenize("a dog", context_length=8).shape == (1, 8)
    assert tk.default_tokenizer() is tk.default_tokenizer()


def test_input_kinds(tok, corpus, corpus_ids):
    texts = corpus[:50]
    np.testing.assert_array_equal(tok(tuple(texts)), corpus_ids[:50])
    np.testing.assert_array_equal(tok(np.array(texts, dtype=object)), corpus_ids[:50])
    encodable = [t for t in texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
    np.testing.assert_array_equal(tok([t.encode("utf-8") for t in encodable]), tok(encodable))
    np.testing.assert_array_equal(tok(b"a dog"), tok("a dog"))
    np.testing.assert_array_equal(tok(np.array(["a dog", "a cat"])), tok(["a dog", "a cat"]))


def test_decode(tok):
    assert tok.decode(tok.encode("A photo of a Dog!")) == "a photo of a dog ! "
    row = tok("Tom &amp; Jerry, 東京 😀")[0]
    assert tok.decode(row, skip_special_tokens=True) == "tom & jerry , 東京 😀 "
    assert tok.decode(row).startswith("<start_of_text>tom")
    assert tok.decode([]) == ""


def test_decode_roundtrip_words(tok):
    for text in captions(200, seed=3):
        cleaned = clean_text(text)
        decoded = tok.decode(tok.encode(text))
        assert decoded.replace(" ", "") == cleaned.replace(" ", "")


def test_pickle(tok, corpus, corpus_ids):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.context_length == tok.context_length and clone.backend == tok.backend
    np.testing.assert_array_equal(clone(corpus[:200]), corpus_ids[:200])
    assert len(pickle.dumps(tok)) < 1000      # the pickle holds settings, not the vocab


@pytest.mark.parametrize("cache_limit", [tk._CACHE_LIMIT, 300])
def test_threads(corpus, corpus_ids, monkeypatch, cache_limit):
    # A fresh tokenizer shared by 6 threads: concurrent cache misses, inserts, and (with the
    # small limit) cache replacements while other threads read.
    monkeypatch.setattr(tk, "_CACHE_LIMIT", cache_limit)
    shared, results, errors = Tokenizer(), {}, []

    def work(k):
        try:
            for rep in range(3):
                part = slice(k * 400, (k + 1) * 400)
                results[(k, rep)] = shared(corpus[part])
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (k, _), out in results.items():
        np.testing.assert_array_equal(out, corpus_ids[k * 400:(k + 1) * 400])


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="str or a sequence"):
        tok(42)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        tok([b"\xff\xfe"])
    for bad in (1, 0, -5, 2.5, True, "77"):
        with pytest.raises(ValueError, match="context_length must be an integer >= 2"):
            tok("x", context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=1)
    with pytest.raises(FileNotFoundError, match="vocab_path=None"):
        Tokenizer(vocab_path=str(tmp_path / "missing.txt.gz"))
    junk = tmp_path / "junk.txt.gz"
    with gzip.open(junk, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="does not look like CLIP's BPE merges"):
        Tokenizer(vocab_path=str(junk))
    with pytest.raises(ValueError, match="backend"):
        Tokenizer(backend="cuda")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 49408])
    with pytest.raises(TypeError, match="integer token ids"):
        tok.decode([1.5])


_TF_SCRIPT = """
import pickle, sys
import numpy as np
import tensorflow as tf
tok = pickle.loads(sys.stdin.buffer.read())
texts = ["a photo of a dog", "Tom &amp; Jerry", "東京タワー", "", "x " * 100] * 5
ds = tf.data.Dataset.from_tensor_slices(texts).batch(8).map(
    lambda s: tf.numpy_function(lambda b: tok(list(b)), [s], tf.int32))
got = np.concatenate([b.numpy() for b in ds])
np.testing.assert_array_equal(got, tok(texts))
print("rows", got.shape[0])
"""


def test_tf_numpy_function(tok):
    # In a subprocess: TensorFlow imported before torchvision segfaults the interpreter, and
    # this also checks the tokenizer survives pickling into another process.
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow not installed")
    proc = subprocess.run([sys.executable, "-c", _TF_SCRIPT], input=pickle.dumps(tok),
                          capture_output=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                               "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"rows 25" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Fuzzing
# ---------------------------------------------------------------------------------------------

ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                   max_size=120)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ANY_TEXT, min_size=1, max_size=5), st.integers(2, 90))
def test_fuzz_any_unicode(texts, length):
    tok = tk.default_tokenizer()
    out = tok(texts, context_length=length)
    assert out.shape == (len(texts), length) and out.dtype == np.int32
    assert (out >= 0).all() and (out < tok.vocab_size).all()
    assert (out[:, 0] == tok.sot_token_id).all()
    for row in out:
        eot = np.flatnonzero(row == tok.eot_token_id)
        assert eot.size >= 1 and not row[eot[-1] + 1:].any()
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(out[i], definition_row(tok, text, length))


# ---------------------------------------------------------------------------------------------
# Parity with open_clip (the reference)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


@pytest.mark.parity
def test_parity_corpus(corpus, corpus_ids):
    import open_clip
    np.testing.assert_array_equal(corpus_ids, open_clip.tokenize(corpus).numpy())


@pytest.mark.parity
def test_parity_corpus_short_context(tok, reference, corpus):
    texts = corpus[:1500]
    np.testing.assert_array_equal(tok(texts, context_length=16),
                                  reference(texts, context_length=16).numpy())


@pytest.mark.parity
def test_parity_captions(tok, reference):
    texts = captions(5000, seed=4)
    np.testing.assert_array_equal(tok(texts), reference(texts).numpy())


@pytest.mark.parity
def test_parity_encode_decode(tok, reference, corpus, corpus_ids):
    for text in corpus[:1500]:
        ids = tok.encode(text)
        assert ids == reference.encode(text), repr(text)
        assert tok.decode(ids) == reference.decode(ids)
    for row in corpus_ids[:300]:
        assert tok.decode(row) == reference.decode(row)


@pytest.mark.parity
def test_parity_vocab(tok, reference):
    assert tok._encoder == reference.encoder
    assert tok.vocab_size == reference.vocab_size
    assert (tok.sot_token_id, tok.eot_token_id) == (reference.sot_token_id,
                                                    reference.eot_token_id)


@pytest.mark.parity
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ANY_TEXT | st.text(st.sampled_from(list(FAST_ASCII)), max_size=80),
                      min_size=1, max_size=4))
def test_parity_hypothesis(reference, texts):
    tok = tk.default_tokenizer()
    np.testing.assert_array_equal(tok(texts), reference(texts).numpy())
