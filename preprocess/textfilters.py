"""Text measures, quality filters and the duplicate index behind ``preprocess/clean.py``.

Everything here works on plain strings, so it serves every stage: clean.py decides which text of a
record is measured (a pretrain text, or the joined contents of a conversation) and which is its
duplicate key.

- :func:`normalise`: Unicode NFKC, lower case, every whitespace run folded to one space, stripped.
  Exact duplicates are records whose normalised keys are equal (an 8-byte BLAKE2b digest is stored).
- Near duplicates: MinHash over the set of character ``SHINGLE``-grams of the normalised key
  (characters, not words, so Chinese works), indexed by datasketch's MinHashLSH at a Jaccard
  threshold. With 2-grams a 3 % character edit rate changes at most ~6 % of the shingles, so such a
  copy stays near Jaccard 0.89 (above the 0.8 default; 3-grams gave only ~82 % recall at 0.8), while
  distinct documents of the shipped sample share far fewer (tests/test_clean.py measures recall >= 90 %
  and false positives <= 1 %).
- :class:`Measures`: the shares the noise filters compare with their thresholds. Each one-character class
  (letters, CJK, digits, spaces, controls, symbols) is defined by a regular expression; a table built by
  running those over the 65,536 BMP code points gives every character's classes, so a text is counted
  by one lookup (the expressions themselves count its rare characters above U+FFFF). URLs and mojibake,
  which span characters, are found by their expressions.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHINGLE = 2
NUM_PERM = 128
MINHASH_SEED = 1

_SPACE = re.compile(r"\s+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_LETTER = re.compile(r"[^\W\d_]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"\d")
SYMBOL_PLANES_END = 0x20000  # every code point of Unicode category S* lies below (planes 0 and 1)
# A URL is printable ASCII: in Chinese text the next sentence often follows a URL without a space.
_URL = re.compile(r"(?:https?://|www\.)[!-~]+", re.IGNORECASE)
_WORD = re.compile(r"\w")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# U+FFFD, or UTF-8 bytes read as Latin-1 / cp1252 ("Ã©" for "é", "â€™" for "’", "Â " for a no-break space).
_MOJIBAKE = re.compile("\ufffd|Ã[\u0080-\u00bf]|â€[\u0080-\u00bf\u2018-\u201e\u2020-\u2122]|Â[\u00a0-\u00bf]")


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace runs folded to one space, stripped: the text duplicates are compared on."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def digest(key: str) -> int:
    """The 64-bit BLAKE2b digest of a normalised key, as an int (what the exact index stores)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


@lru_cache(maxsize=1)
def _symbols() -> re.Pattern:
    """Every Unicode symbol (categories Sm, Sc, Sk, So: math, currency, modifier and other symbols such as
    box drawing, arrows, U+25A1 placeholder squares, emoji). Punctuation (P*) is not among them: Chinese
    prose puts a full-width mark every few characters and LaTeX is mostly brackets, both text, not noise.

    Built once per process from unicodedata (~0.04 s) as two classes: the BMP one compiles to a lookup
    table, and the astral one (a list of ranges, tried one by one) is guarded by one range check, so a
    BMP character never walks that list."""
    bmp, astral = [], []
    start = None
    for cp in range(SYMBOL_PLANES_END + 1):
        symbol = cp < SYMBOL_PLANES_END and unicodedata.category(chr(cp)).startswith("S")
        if symbol and start is None:
            start = cp
        elif not symbol and start is not None:
            (bmp if start < 0x10000 else astral).append(
                re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            start = None
    return re.compile("[" + "".join(bmp) + "]|(?=[\U00010000-\U0010ffff])[" + "".join(astral) + "]")


def _count(pattern: re.Pattern, text: str) -> int:
    return len(text) - len(pattern.sub("", text))


_SPACE_CHAR = re.compile(r"\s")
_FLAG_BITS = np.unpackbits(np.arange(256, dtype=np.uint8).reshape(-1, 1), axis=1, bitorder="little").astype(np.int64)


@lru_cache(maxsize=1)
def _counted_classes() -> tuple[re.Pattern, ...]:
    """The one-character classes Measures counts, each defined by its regular expression, in flag-bit
    order: letters, CJK, ASCII letters, digits, spaces, controls, symbols."""
    return _LETTER, _CJK, _ASCII_LETTER, _DIGIT, _SPACE_CHAR, _CONTROL, _symbols()


@lru_cache(maxsize=1)
def _bmp_flags() -> np.ndarray:
    """Per code point below U+10000, the bit flags of the classes it belongs to (bit i: class i), found by
    running each class's own regular expression once over all 65,536 code points, so a table lookup
    counts exactly what the expression would."""
    every = "".join(map(chr, range(0x10000)))
    flags = np.zeros(0x10000, dtype=np.uint8)
    for bit, pattern in enumerate(_counted_classes()):
        flags[[m.start() for m in pattern.finditer(every)]] |= np.uint8(1 << bit)
    return flags


def build_tables() -> None:
    """Build the class tables now (~0.04 s): in the main process, so that forked workers inherit them."""
    _bmp_flags()


def _class_counts(codes: np.ndarray) -> list[int]:
    """How many of the code points ``codes`` are in each class: for the BMP a table lookup, a histogram of
    the flag bytes and its product with their bits (``_FLAG_BITS[v, i]``: bit i of v); the expressions
    themselves for the rare characters above it."""
    classes, bmp = _counted_classes(), codes < 0x10000
    counts = (np.bincount(_bmp_flags()[codes[bmp]], minlength=256) @ _FLAG_BITS)[:len(classes)].tolist()
    if not bmp.all():
        astral = "".join(map(chr, codes[~bmp].tolist()))
        counts = [n + _count(p, astral) for n, p in zip(counts, classes, strict=True)]
    return counts


@dataclass(frozen=True)
class Measures:
    """Shares of a text: ``cjk_ratio`` and ``ascii_ratio`` among letters; ``symbol_ratio`` (Unicode symbols,
    not punctuation: :func:`_symbols`), ``digit_ratio`` and ``url_ratio`` among non-space characters; the
    longest run of one character; the share of lines that repeat an earlier line (lines with a letter or
    digit: dividers such as "```" or "+----+" are layout); control / mojibake counts."""

    cjk_ratio: float
    ascii_ratio: float
    symbol_ratio: float
    digit_ratio: float
    url_ratio: float
    longest_run: int
    dup_line_ratio: float
    control_chars: int
    mojibake: int

    @classmethod
    def of(cls, text: str) -> Measures:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        letters, cjk, ascii_letters, digits, spaces, control, symbols = _class_counts(codes)
        visible = max(1, len(text) - spaces)
        lines = [s for s in (line.strip() for line in text.splitlines()) if _WORD.search(s)]  # not dividers
        return cls(
            cjk_ratio=cjk / letters if letters else 0.0,
            ascii_ratio=ascii_letters / letters if letters else 0.0,
            symbol_ratio=symbols / visible,
            digit_ratio=digits / visible,
            url_ratio=sum(len(m) for m in _URL.findall(text)) / visible,
            longest_run=longest_run(codes),
            dup_line_ratio=(len(lines) - len(set(lines))) / len(lines) if len(lines) >= 3 else 0.0,
            control_chars=control,
            mojibake=len(_MOJIBAKE.findall(text)),
        )


def longest_run(codes: np.ndarray) -> int:
    """The length of the longest run of one repeated code point in ``codes`` (0 when empty)."""
    if not len(codes):
        return 0
    change = np.flatnonzero(codes[1:] != codes[:-1])
    bounds = np.concatenate(([-1], change, [len(codes) - 1]))
    return int(np.diff(bounds).max())


def shingle_hashes(key: str, size: int | None = None) -> np.ndarray:
    """The distinct 32-bit hashes of the character ``size``-grams of ``key`` (one gram for a shorter key).

    A gram's hash is a polynomial of its code points modulo 2**64 folded to 32 bits, computed for every
    position at once with numpy; MinHash mixes it further (datasketch's fmix) before permuting.
    """
    size = size or SHINGLE
    codes = np.frombuffer(key.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < size:
        size = max(1, len(codes))
    n = len(codes) - size + 1
    h = np.zeros(max(n, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(size):
            h = h * np.uint64(0x100000001B3) + codes[j:j + n]
    return np.unique((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF))


@dataclass(frozen=True)
class Fingerprint:
    """What the duplicate index compares: the key's 64-bit digest and, for near matching, its band digests."""

    digest: int
    bands: tuple[int, ...] = ()


class Fingerprinter:
    """Key -> :class:`Fingerprint`; pure, so worker processes compute it and only the index is sequential.

    The LSH is datasketch's banding: the ``b`` bands of ``r`` rows that ``MinHashLSH`` chooses for the
    threshold (0.8, 128 permutations: 9 x 13) over a ``MinHash`` of the key's shingles (fixed seed, so
    every process makes the same sketch); each band is reduced to one 64-bit digest of (band number,
    band values).
    """

    def __init__(self, near: bool, threshold: float = 0.8, num_perm: int = NUM_PERM):
        self.near = near
        if near:
            from datasketch import MinHash, MinHashLSH

            self._template = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
            self._minhash = MinHash
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
            self.b, self.r = lsh.b, lsh.r

    def __call__(self, key: str) -> Fingerprint:
        if not self.near:
            return Fingerprint(digest(key))
        t = self._template
        m = self._minhash(num_perm=t.num_perm, seed=MINHASH_SEED, hashfunc=int, permutations=t.permutations,
                          scheme=t.scheme)
        m.update_batch(shingle_hashes(key).tolist())
        values = m.hashvalues[:self.b * self.r].reshape(self.b, self.r)
        return Fingerprint(digest(key), tuple(
            int.from_bytes(hashlib.blake2b(band.tobytes(), digest_size=8, salt=i.to_bytes(2, "little")).digest(),
                           "little") for i, band in enumerate(values)))


class DigestSet:
    """A set of 64-bit digests in about 8 bytes each: a sorted ``uint64`` array of unique digests plus a
    Python set of the latest ones, merged into the array (one linear merge of two sorted runs, repeats
    dropped) when it reaches ``buffer`` entries. Membership: the set, then a binary search of the array."""

    def __init__(self, buffer: int = 1 << 18) -> None:
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.buffer = buffer

    def __contains__(self, value: int) -> bool:
        return self.contains_any((value,))

    def contains_any(self, values: tuple[int, ...]) -> bool:
        if any(v in self.recent for v in values):
            return True
        if not len(self.sorted) or not values:
            return False
        query = np.array(values, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self.sorted, query), len(self.sorted) - 1)
        return bool((self.sorted[pos] == query).any())

    def update(self, values: tuple[int, ...]) -> None:
        self.recent.update(values)
        if len(self.recent) >= self.buffer:
            new = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            merged = np.sort(np.concatenate([self.sorted, new]), kind="stable")  # two sorted runs: a merge
            self.sorted = merged[np.concatenate([[True], merged[1:] != merged[:-1]])]
            self.recent = set()


class DuplicateIndex:
    """The fingerprints seen so far: a :class:`DigestSet` of key digests and one of band digests.

    :meth:`match` says whether a fingerprint duplicates one already added: "exact" (same digest),
    "near" (one band in common: an LSH candidate, as MinHashLSH.query answers) or None; :meth:`add`
    records it. Since clean.py only asks *whether* an earlier key matches, the bands go in one set of
    64-bit digests instead of MinHashLSH's per-bucket key sets, and a DigestSet keeps each in about 8
    bytes (a Python set of ints takes ~90). The two sets are the only state that grows.
    """

    def __init__(self) -> None:
        self.exact = DigestSet()
        self.bands = DigestSet()
        self._count = 0

    def match(self, fp: Fingerprint) -> str | None:
        if fp.digest in self.exact:
            return "exact"
        return "near" if self.bands.contains_any(fp.bands) else None

    def add(self, fp: Fingerprint) -> None:
        self.exact.update((fp.digest,))
        self.bands.update(fp.bands)
        self._count += 1

    def __len__(self) -> int:
        return self._count
