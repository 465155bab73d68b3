"""OpenAI CLIP's byte-level BPE tokenizer: exact ids, fast batches.

Every id this module returns equals what open_clip's ``SimpleTokenizer`` / ``open_clip.tokenize``
returns for the same text (tests/clipjax/test_tokenizer.py checks thousands of adversarial
strings and fuzzes), and so OpenAI CLIP's, except for texts that literally contain a special
token's spelling (see below). The reference pipeline per text is::

    ftfy.fix_text → html.unescape twice → collapse whitespace → lower()
    → regex pre-tokenisation → UTF-8 bytes as printable chars → BPE merges → ids

and the output row is ``[SOT] + ids + [EOT]``, cut to ``context_length`` keeping EOT last,
padded with 0.

Why it is fast without changing a single id:

* **ftfy is skipped only where it provably returns its input unchanged.** ftfy is a fixed
  series of steps, each of which either touches a known set of characters (HTML entities
  need ``&``, ligatures/width/quote/control tables, line breaks, surrogates) or is gated by a
  test we can run ourselves (mojibake repair runs only on text that ``ftfy.is_bad`` flags;
  NFC leaves NFC text alone). :func:`ftfy_is_noop` evaluates exactly those conditions using
  ftfy's own tables and functions, segment by segment as ``ftfy.fix_text`` does. If the
  installed ftfy does not have the structure this was derived from, the shortcut switches
  itself off and every text goes through ftfy.
* **Plain-ASCII batches skip all per-text Python work.** For text made of printable ASCII
  (except ``&``), tab, newline and form feed, ftfy and ``html.unescape`` are no-ops and the
  only whitespace is whitespace for both ``str.split`` and the reference regex, so collapsing
  it cannot move a token boundary. Such texts are joined into one string, lower-cased and
  split once, in C.
* **Ids are cached per whitespace-delimited chunk.** The reference regex never matches
  whitespace, so a text's tokens are the concatenation of its chunks' tokens; ``"dog,"``
  is looked up once and then costs one dict lookup. Chunks not yet seen go through the
  reference regex (the ``regex`` module, same pattern and flags) and BPE (HF ``tokenizers``
  in Rust, built from the packaged merges; a pure-Python BPE is the fallback).

The special tokens are spelled as in open_clip (``<start_of_text>``, ``<end_of_text>``;
OpenAI's original spells them ``<|startoftext|>``/``<|endoftext|>``). The ids are the same,
49406 and 49407. As in open_clip, the literal spelling inside a text (in any case) becomes
that id; OpenAI's tokenizer does the same for its own spelling.
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import re
import threading
import unicodedata
from collections.abc import Sequence
from typing import Optional, Union

import ftfy
import numpy as np
import regex

__all__ = ["Tokenizer", "tokenize", "default_tokenizer", "clean_text", "ftfy_is_noop",
           "DEFAULT_VOCAB_PATH", "DEFAULT_CONTEXT_LENGTH"]

DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "bpe_simple_vocab_16e6.txt.gz")
DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# The vocab file holds more merges than CLIP uses; CLIP keeps the first 49152 - 256 - 2 so
# that bytes (256) + bytes-at-word-end (256) + merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2

# The reference pre-tokenisation: specials, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace. IGNORECASE matters even on lower-cased text
# ("'ſ" matches "'s").
_PRETOKENIZE = regex.compile(
    rf"{regex.escape(SOT_TOKEN)}|{regex.escape(EOT_TOKEN)}"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)

# The same pattern for ASCII-only text, on the faster `re` engine: on ASCII, \p{L} is
# [A-Za-z] and \p{N} is [0-9] (the tests compare both patterns on every ASCII character).
_PRETOKENIZE_ASCII = re.compile(
    rf"{re.escape(SOT_TOKEN)}|{re.escape(EOT_TOKEN)}"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]+",
    re.IGNORECASE | re.ASCII)

# Separates texts inside one joined batch string. It never reaches the pre-tokeniser: texts
# containing it take the careful path, and cleaning removes it (ftfy drops C0 controls).
_SEP = "\x00"
_SEP_ID = -1
# Characters of the plain-ASCII fast path: printable ASCII minus '&', plus tab, newline,
# form feed (and the separator, which is counted separately).
_NOT_FAST_ASCII = re.compile(r"[^\x00\t\n\x0c\x20-\x25\x27-\x7e]")
_FAST_BYTES = bytes(b for b in range(128) if not _NOT_FAST_ASCII.match(chr(b)))
_NOT_FAST_LUT = np.array([bool(_NOT_FAST_ASCII.match(chr(b))) for b in range(128)])

_MAX_CACHED_CHUNK = 128        # longer chunks are tokenised but not remembered
_CACHE_LIMIT = 1 << 20         # entries per cache (chunks, words) before it starts afresh


def _byte_alphabet() -> tuple[list[str], dict[int, str]]:
    """The 256 printable characters that stand for the bytes 0..255 (GPT-2/CLIP convention).

    Bytes that are printable in Latin-1 stand for themselves; the other 68 are given the code
    points from 256 upward, in byte order. The list is in CLIP's vocab order: first the
    self-standing bytes, then the shifted ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    self_standing = set(printable)
    shifted = [b for b in range(256) if b not in self_standing]
    char_of = {b: chr(b) for b in printable}
    char_of.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return [char_of[b] for b in printable + shifted], char_of


_BYTE_ORDER, _BYTE_CHAR = _byte_alphabet()
# str.translate tables: Latin-1 char (= byte value) → byte char, and back.
_TO_BYTE_CHARS = {b: c for b, c in _BYTE_CHAR.items()}
_FROM_BYTE_CHARS = {ord(c): b for b, c in _BYTE_CHAR.items()}


def _byte_chars(word: str) -> str:
    """'é' → 'Ã©': the UTF-8 bytes of ``word``, one printable character per byte."""
    return word.encode("utf-8").decode("latin-1").translate(_TO_BYTE_CHARS)


# --------------------------------------------------------------------------------------------
# ftfy: when is fix_text(text) == text?
# --------------------------------------------------------------------------------------------

# The ftfy configuration the no-op analysis was derived from (ftfy 6.3). A different set of
# steps or defaults switches the shortcut off rather than risking a wrong answer.
_ANALYZED_FTFY_CONFIG = {
    "unescape_html": "auto", "remove_terminal_escapes": True, "fix_encoding": True,
    "restore_byte_a0": True, "replace_lossy_sequences": True, "decode_inconsistent_utf8": True,
    "fix_c1_controls": True, "fix_latin_ligatures": True, "fix_character_width": True,
    "uncurl_quotes": True, "fix_line_breaks": True, "fix_surrogates": True,
    "remove_control_chars": True, "normalization": "NFC", "max_decode_length": 1000000,
    "explain": True,
}


def _build_ftfy_touched():
    """A regex matching every character some ftfy step rewrites, or None if ftfy is unknown.

    Step by step (ftfy.fix_and_explain): unescape_html needs '&'; fix_c1_controls,
    uncurl_quotes and fix_surrogates are character-class substitutions; fix_latin_ligatures,
    fix_character_width and remove_control_chars translate with tables; fix_line_breaks
    replaces \\r, U+2028, U+2029, U+0085; remove_terminal_escapes needs ESC (also a control
    character). fix_encoding and NFC are handled by ``ftfy_is_noop`` itself.
    """
    try:
        from ftfy import chardata, fixes
        config = ftfy.TextFixerConfig()
        structure_ok = (
            dict(config._asdict()) == _ANALYZED_FTFY_CONFIG
            and set(ftfy.FIXERS) == {
                "unescape_html", "remove_terminal_escapes", "restore_byte_a0",
                "replace_lossy_sequences", "decode_inconsistent_utf8", "fix_c1_controls",
                "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
                "fix_line_breaks", "fix_surrogates", "remove_control_chars"}
            and chardata.HTML_ENTITY_RE.pattern.startswith("&")
            and fixes.ANSI_RE.pattern.startswith("\x1b")
            and 0x1B in chardata.CONTROL_CHARS
            and callable(getattr(ftfy, "is_bad", None))
            and callable(getattr(chardata, "possible_encoding", None))
        )
        if not structure_ok:
            return None
        tables = set(chardata.CONTROL_CHARS) | set(chardata.LIGATURES) | set(chardata.WIDTH_MAP)
        tables |= {ord(c) for c in "&\r\u2028\u2029\x85\x1b"}
        table_class = "[" + "".join(f"\\U{cp:08x}" for cp in sorted(tables)) + "]"
        classes = [chardata.C1_CONTROL_RE.pattern, chardata.SINGLE_QUOTE_RE.pattern,
                   chardata.DOUBLE_QUOTE_RE.pattern, fixes.SURROGATE_RE.pattern, table_class]
        if all(p.startswith("[") and p.endswith("]") and not p.startswith("[^")
               and p.count("[") == 1 for p in classes):
            return re.compile("[" + "".join(p[1:-1] for p in classes) + "]")  # one class: fast
        return re.compile("|".join(f"(?:{p})" for p in classes))
    except (ImportError, AttributeError, TypeError):
        return None


_FTFY_TOUCHED = _build_ftfy_touched()


def _ftfy_segments(text: str):
    """The pieces ftfy.fix_text fixes independently: lines, each keeping its '\\n'."""
    parts = text.split("\n")
    for part in parts[:-1]:
        yield part + "\n"
    if parts[-1]:
        yield parts[-1]


def ftfy_is_noop(text: str) -> bool:
    """True only if ``ftfy.fix_text(text) == text`` is guaranteed (False means "don't know").

    Mirrors ``ftfy.fix_text``: per line segment, no step may have anything to do — no
    character any step rewrites, the mojibake detector (``ftfy.is_bad``) silent unless the
    segment is ASCII, and the segment already NFC.
    """
    if _FTFY_TOUCHED is None or len(text) > _ANALYZED_FTFY_CONFIG["max_decode_length"]:
        return False
    if _FTFY_TOUCHED.search(text):
        return False
    if text.isascii():
        return True          # fix_encoding passes ASCII through; NFC keeps ASCII
    from ftfy import chardata
    for segment in _ftfy_segments(text):
        if not (chardata.possible_encoding(segment, "ascii") or not ftfy.is_bad(segment)):
            return False
        if not unicodedata.is_normalized("NFC", segment):
            return False
    return True


def clean_text(text: str) -> str:
    """The reference cleaning: ftfy, HTML unescaping (twice), whitespace collapse, lower case.

    ``clean_text(t)`` equals open_clip's ``whitespace_clean(basic_clean(t)).lower()``; ftfy is
    only skipped when :func:`ftfy_is_noop` proves it would change nothing.
    """
    if not ftfy_is_noop(text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    # basic_clean's strip() and whitespace_clean's strip() are implied by split()/join.
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------------
# Vocabulary and BPE
# --------------------------------------------------------------------------------------------

def _load_merges(vocab_path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(
            f"CLIP BPE vocab not found at {vocab_path!r}. Pass vocab_path=None to use the copy "
            "packaged with clipjax (bpe_simple_vocab_16e6.txt.gz), or reinstall clipjax.")
    try:
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{vocab_path!r} is not a gzipped UTF-8 BPE merges file "
                         f"(like bpe_simple_vocab_16e6.txt.gz): {e}") from e
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{vocab_path!r} does not look like CLIP's BPE merges file: expected a header line "
            f"and at least {_NUM_MERGES} lines of two space-separated symbols.")
    return merges


class _PythonBPE:
    """The BPE merge loop in plain Python: repeatedly merge every occurrence (left to right)
    of the adjacent pair with the lowest merge rank, until no pair has a rank."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self._encoder = encoder
        self._ranks = {pair: i for i, pair in enumerate(merges)}

    def __call__(self, word: str) -> list[int]:
        symbols = [*word[:-1], word[-1] + "</w>"]
        ranks = self._ranks
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self._encoder[s] for s in symbols]


class _RustBPE:
    """HF ``tokenizers`` BPE (Rust) over pre-split, byte-encoded words.

    Only the merge model is used: no normaliser, no pre-tokeniser, no added tokens — those
    are done exactly in Python. CLIP's merges are in creation order (every merge's parts are
    made by earlier merges), so the priority-queue merging of ``tokenizers`` yields the same
    pieces as the reference loop; the tests check this on every merge in the vocab.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        from tokenizers import models
        self._model = models.BPE(vocab=encoder, merges=merges, end_of_word_suffix="</w>",
                                 continuing_subword_prefix="", fuse_unk=False)

    def __call__(self, word: str) -> list[int]:
        return [t.id for t in self._model.tokenize(word)]


def _rust_available() -> bool:
    try:
        import tokenizers  # noqa: F401
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TextInput = Union[str, bytes, Sequence[Union[str, bytes]]]


class Tokenizer:
    """OpenAI CLIP's BPE tokenizer (49,408 ids), identical ids to open_clip, batched and fast.

    Args:
      vocab_path: gzipped BPE merges file; None uses the copy packaged with clipjax.
      context_length: default row length of ``__call__`` (77 for every OpenAI CLIP model).
      backend: "auto" (Rust ``tokenizers`` if installed, else Python), "rust" or "python".
        Both give the same ids; this only picks who runs the BPE merges for unseen words.

    Thread-safe (the shared chunk cache is only ever added to or replaced, never mutated
    under a reader) and picklable (the pickle holds the path, the unpickled copy reloads).
    """

    def __init__(self, vocab_path: Optional[str] = None,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, backend: str = "auto"):
        self._vocab_path = vocab_path
        self.context_length = _check_context_length(context_length)
        if backend not in ("auto", "rust", "python"):
            raise ValueError(f"backend must be 'auto', 'rust' or 'python', got {backend!r}.")
        if backend == "rust" and not _rust_available():
            raise ImportError("backend='rust' needs the `tokenizers` package: pip install "
                              "tokenizers (or use backend='python').")
        self._backend = backend
        self.backend = "rust" if backend == "rust" or (
            backend == "auto" and _rust_available()) else "python"

        merges = _load_merges(vocab_path or DEFAULT_VOCAB_PATH)
        vocab = _BYTE_ORDER + [c + "</w>" for c in _BYTE_ORDER] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = vocab
        self.vocab_size = len(vocab)
        self.sot_token_id = self._encoder[SOT_TOKEN]
        self.eot_token_id = self._encoder[EOT_TOKEN]
        self._bpe = (_RustBPE if self.backend == "rust" else _PythonBPE)(self._encoder, merges)
        self._specials = {SOT_TOKEN: (self.sot_token_id,), EOT_TOKEN: (self.eot_token_id,)}
        self._cache = {_SEP: (_SEP_ID,)}                # whitespace-free chunk → ids
        self._words = dict(self._specials)              # pre-tokenised word → ids
        self._lock = threading.Lock()    # serialises cache replacement only

    # -- pickling: rebuild from the path instead of shipping 49k-entry dicts -----------------
    def __getstate__(self):
        return {"vocab_path": self._vocab_path, "context_length": self.context_length,
                "backend": self._backend}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length},"
                f" backend={self.backend!r})")

    # -- public API --------------------------------------------------------------------------
    def __call__(self, texts: TextInput, context_length: Optional[int] = None) -> np.ndarray:
        """Tokenise text(s) into fixed-length rows.

        Args:
          texts: one string or a sequence of strings (bytes are decoded as UTF-8, which is
            what tf.data hands to a ``py_function``).
          context_length: row length; defaults to ``self.context_length``.

        Returns:
          tokens: b l int32 — ``[SOT] + ids + [EOT]``, truncated to ``l`` with EOT kept as
          the last token, padded with 0. ``b`` is 1 for a single string.
        """
        length = self.context_length if context_length is None else \
            _check_context_length(context_length)
        texts = _as_text_list(texts)
        n = len(texts)
        out = np.zeros((n, length), np.int32)
        if n == 0:
            return out
        joined = _SEP.join(texts)
        fast = _fast_texts(texts, joined)
        if fast.all():
            self._fill(out, np.arange(n), joined.lower())
            return out
        slow = np.flatnonzero(~fast)
        if fast.any():
            idx = np.flatnonzero(fast)
            self._fill(out, idx, _SEP.join([texts[i] for i in idx]).lower())
        cleaned = [clean_text(texts[i]) for i in slow]
        joined_slow = _SEP.join(cleaned)
        if joined_slow.count(_SEP) == len(cleaned) - 1:
            self._fill(out, slow, joined_slow)
        else:   # cannot happen (ftfy removes NUL), but never let a NUL pose as a separator
            for row, text in zip(slow, cleaned):
                flat = np.array(self._chunk_ids_uncached(text), dtype=np.int64)
                _pack(out, np.array([row]), flat, self.sot_token_id, self.eot_token_id)
        return out

    def encode(self, text: Union[str, bytes]) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        (text,) = _as_text_list([text])
        ids = []
        for chunk in clean_text(text).split():
            ids.extend(self._chunk_ids(chunk))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids, as the reference decodes it ('</w>' becomes a space).

        With ``skip_special_tokens``, SOT is dropped and decoding stops at the first EOT
        (so a padded row from ``__call__`` decodes to just its text).
        """
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"decode expects integer token ids, got dtype {arr.dtype}.")
        ids = arr.reshape(-1).astype(np.int64).tolist()
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[:ids.index(self.eot_token_id)]
            ids = [i for i in ids if i != self.sot_token_id]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.vocab_size}).")
        text = "".join([self._decoder[i] for i in ids])
        raw = text.translate(_FROM_BYTE_CHARS).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    # -- internals ---------------------------------------------------------------------------
    def _fill(self, out: np.ndarray, rows: np.ndarray, joined: str) -> None:
        """Write SOT + ids + EOT for the texts in ``joined`` (cleaned, separated by _SEP) into
        ``out[rows]``. Splitting on whitespace is exact: no reference token spans whitespace.
        """
        chunks = joined.replace(_SEP, " \x00 ").split()
        cache = self._cache
        try:
            pieces = list(map(cache.__getitem__, chunks))
        except KeyError:
            pieces = self._pieces_with_misses(chunks, cache)
        flat = np.array(list(itertools.chain.from_iterable(pieces)), dtype=np.int64)
        _pack(out, rows, flat, self.sot_token_id, self.eot_token_id)

    def _pieces_with_misses(self, chunks: list[str], cache: dict) -> list[tuple]:
        fresh = {c: tuple(self._chunk_ids_uncached(c)) for c in set(chunks).difference(cache)}
        with self._lock:
            current = self._cache
            if len(current) + len(fresh) > _CACHE_LIMIT:
                # Replace rather than clear: readers holding the old dict stay valid.
                current = self._cache = {_SEP: (_SEP_ID,)}
            current.update(fresh)
        try:
            pieces = list(map(current.__getitem__, chunks))
        except KeyError:   # the cache was replaced or trimmed meanwhile: look up by hand
            pieces = [fresh.get(c) or cache.get(c) or tuple(self._chunk_ids_uncached(c))
                      for c in chunks]
        for c in fresh:    # long chunks are rarely seen twice: do not keep them
            if len(c) > _MAX_CACHED_CHUNK:
                current.pop(c, None)
        return pieces

    def _chunk_ids(self, chunk: str) -> tuple:
        hit = self._cache.get(chunk) if chunk != _SEP else None
        return hit if hit is not None else tuple(self._chunk_ids_uncached(chunk))

    def _chunk_ids_uncached(self, chunk: str) -> list[int]:
        """Reference regex over the chunk, then per word: special id, cached ids, or BPE."""
        words = self._words
        ids = []
        pretokenize = _PRETOKENIZE_ASCII if chunk.isascii() else _PRETOKENIZE
        for word in pretokenize.findall(chunk):
            hit = words.get(word)
            if hit is None:
                hit = tuple(self._bpe(_byte_chars(word)))
                if len(words) >= _CACHE_LIMIT:   # replace, never clear under a reader
                    words = self._words = dict(self._specials)
                words[word] = hit
            ids.extend(hit)
        return ids


def _fast_texts(texts: list[str], joined: str) -> np.ndarray:
    """Which texts may take the plain-ASCII path (bool per text), from one scan of the batch."""
    n = len(texts)
    if joined.count(_SEP) != n - 1:       # a text contains the separator itself: rare
        return np.array([_SEP not in t and not _NOT_FAST_ASCII.search(t) for t in texts])
    if joined.isascii():
        raw = joined.encode("ascii")
        if not raw.translate(None, _FAST_BYTES):
            return np.ones(n, bool)        # the common case: two C passes, no per-text work
        bad = _NOT_FAST_LUT[np.frombuffer(raw, np.uint8)]
    else:
        codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), "<u4")
        bad = (codes > 127) | _NOT_FAST_LUT[np.minimum(codes, 127)]
    # Text i ends at the separator at ends[i]; a bad position p belongs to the text whose
    # end is the first one after p.
    ends = np.cumsum(np.fromiter(map(len, texts), np.int64, n) + 1) - 1
    fast = np.ones(n, bool)
    fast[np.searchsorted(ends, np.flatnonzero(bad), side="right")] = False
    return fast


def _pack(out: np.ndarray, rows: np.ndarray, flat: np.ndarray, sot: int, eot: int) -> None:
    """Scatter ``flat`` (ids of consecutive texts separated by _SEP_ID) into rows of ``out``:
    SOT, the first ``l - 2`` ids, EOT, zeros — the reference's truncate-then-set-EOT rule."""
    length = out.shape[1]
    if rows.size == 1:                    # one text: plain slicing beats the scatter
        keep = min(flat.size, length - 2)
        out[rows[0], 0] = sot
        out[rows[0], 1:1 + keep] = flat[:keep]
        out[rows[0], 1 + keep] = eot
        return
    sep = np.flatnonzero(flat == _SEP_ID)
    starts = np.concatenate([[0], sep + 1])
    ends = np.concatenate([sep, [flat.size]])
    keep = np.minimum(ends - starts, length - 2)
    out[rows, 0] = sot
    within = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    out[np.repeat(rows, keep), 1 + within] = flat[np.repeat(starts, keep) + within]
    out[rows, 1 + keep] = eot


def _check_context_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
            or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2 (room for SOT and EOT), got "
                         f"{context_length!r}; CLIP models use 77.")
    return int(context_length)


def _as_text_list(texts) -> list[str]:
    if isinstance(texts, (str, bytes, np.str_, np.bytes_)):
        texts = [texts]
    elif isinstance(texts, np.ndarray):
        texts = texts.reshape(-1).tolist()
    elif not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}.")
    if set(map(type, texts)) <= {str}:
        return list(texts)
    result = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            result.append(str(t))
        elif isinstance(t, (bytes, np.bytes_)):
            try:
                result.append(bytes(t).decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"texts[{i}] is bytes that are not valid UTF-8 ({e}); decode "
                                 "it to str yourself with the right encoding.") from e
        else:
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, expected str (or UTF-8 "
                            f"bytes); convert it with str() first.")
    return result


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged vocab (built once per process)."""
    return Tokenizer()


def tokenize(texts: TextInput, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """``open_clip.tokenize`` as numpy: texts → b l int32 (SOT, BPE ids, EOT, 0-padding)."""
    return default_tokenizer()(texts, context_length=context_length)
