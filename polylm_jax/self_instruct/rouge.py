"""ROUGE-L between a new instruction and every kept one, fast enough for pools of 50,000.

Tokens: lowercased words for space-delimited languages; characters for zh, ja and th, which do not
separate words with spaces (a whitespace split would see one "word" per sentence and call
unrelated sentences different, or identical). ROUGE-L F1 = 2PR/(P+R) with P = LCS/len(candidate),
R = LCS/len(reference), as rouge-score computes it.

The LCS is computed bit-parallel (Hyyrö's formulation of Allison-Dix): a reference of at most 64
tokens is a 64-bit word, and one pass over the candidate's tokens updates the words of all
references that contain the token at once (an inverted index from token to references), so a
comparison against the whole pool costs a few numpy operations per candidate token. References are
compared on their first 64 tokens (instructions are shorter than that).
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

CHARACTER_LANGUAGES = ("zh", "ja", "th")
MAX_TOKENS = 64
_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str, lang: str) -> list[str]:
  text = text.lower()
  if lang in CHARACTER_LANGUAGES:
    # every character but spaces, punctuation and controls (Thai vowel signs are marks: kept)
    return [c for c in text if unicodedata.category(c)[0] not in "ZPC"]
  return _WORD.findall(text)


def lcs(a, b) -> int:
  """Plain dynamic programming (for checking the fast path)."""
  row = [0] * (len(b) + 1)
  for x in a:
    prev = 0
    for j, y in enumerate(b, 1):
      prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
  return row[-1]


class _Posting:
  """The references containing one token: item indices and their position masks, in growable
  numpy arrays (appends amortized O(1), reads without copies)."""

  __slots__ = ("items", "masks", "size")

  def __init__(self):
    self.items = np.zeros(4, np.int64)
    self.masks = np.zeros(4, np.uint64)
    self.size = 0

  def append(self, item: int, mask: int) -> None:
    if self.size == len(self.items):
      self.items = np.concatenate([self.items, np.zeros_like(self.items)])
      self.masks = np.concatenate([self.masks, np.zeros_like(self.masks)])
    self.items[self.size] = item
    self.masks[self.size] = np.uint64(mask)
    self.size += 1


class Pool:
  """Kept instructions of one language, each as token ids; `max_similarity` of a candidate."""

  def __init__(self, lang: str):
    self.lang = lang
    self.ids: dict[str, int] = {}
    self._lengths = np.zeros(1024, np.int64)
    self.size = 0
    self.postings: dict[int, _Posting] = {}

  def __len__(self) -> int:
    return self.size

  def add(self, text: str) -> None:
    tokens = [self.ids.setdefault(t, len(self.ids)) for t in tokenize(text, self.lang)][:MAX_TOKENS]
    if self.size == len(self._lengths):
      self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
    item = self.size
    self._lengths[item] = len(tokens)
    self.size += 1
    masks: dict[int, int] = {}
    for position, token in enumerate(tokens):
      masks[token] = masks.get(token, 0) | (1 << position)
    for token, mask in masks.items():
      self.postings.setdefault(token, _Posting()).append(item, mask)

  def max_similarity(self, text: str) -> float:
    """The highest ROUGE-L F1 of `text` against the pool (0 for an empty pool)."""
    if not self.size or not text.strip():
      return 0.0
    candidate = [self.ids.get(t, -1) for t in tokenize(text, self.lang)]
    if not candidate:
      return 0.0
    n = self._lengths[: self.size]
    v = np.full(self.size, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    with np.errstate(over="ignore"):
      for token in candidate:
        posting = self.postings.get(token)
        if posting is None:
          continue
        items, masks = posting.items[: posting.size], posting.masks[: posting.size]
        old = v[items]
        u = old & masks
        v[items] = (old + u) | (old - u)
    low = np.where(
      n >= 64,
      np.uint64(0xFFFFFFFFFFFFFFFF),
      (np.uint64(1) << np.minimum(n, 63).astype(np.uint64)) - np.uint64(1),
    )
    ones = np.bitwise_count(v & low) if hasattr(np, "bitwise_count") else _popcount(v & low)
    common = n - ones.astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
      p = common / len(candidate)
      r = common / np.maximum(n, 1)
      f = np.where(common > 0, 2 * p * r / (p + r), 0.0)
    return float(f.max())


def _popcount(x: np.ndarray) -> np.ndarray:
  x = x.copy()
  count = np.zeros(x.shape, np.int64)
  while np.any(x):
    count += (x & np.uint64(1)).astype(np.int64)
    x >>= np.uint64(1)
  return count
