"""The embedded sample corpus of PolyLM's 18 languages (`sample/README.md`):

- `sample/<lang>.txt`: 100 everyday sentences, parallel (line i says the same in every language);
- `sample/ud/<lang>.txt`: 741-1,915 sentences of Universal Dependencies treebank text
  (CC BY-SA, attribution in `sample/ud/SOURCES.md`), parallel between the 15 PUD languages.

A language's sample text is the 100 sentences followed by its treebank sentences; every tenth line
(i % 10 == 0) of that is held out as the validation split.
"""

from __future__ import annotations

import pathlib

from polylm_jax import languages

LANGUAGES = languages.POLYLM  # the corpus has exactly PolyLM's 18 languages
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent  # this package holds the corpus
TREEBANK_DIR = SAMPLE_DIR / "ud"
# The treebank files that hold the 1,000 PUD sentences, parallel line by line (nl, vi, he do not).
PUD_LANGUAGES = tuple(lang for lang in LANGUAGES if lang not in ("nl", "vi", "he"))
TOKENIZER_MODEL = SAMPLE_DIR / "sample_sp.model"
VALIDATION_EVERY = 10


def sample_path(lang: str) -> pathlib.Path:
  if lang not in LANGUAGES:
    raise ValueError(f"language {lang!r} is not in the sample corpus; it has {LANGUAGES}")
  return SAMPLE_DIR / f"{lang}.txt"


def _read(path: pathlib.Path) -> list[str]:
  return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _split(lines: list[str], split: str | None) -> list[str]:
  if split is None:
    return lines
  if split not in ("train", "validation"):
    raise ValueError(f"split {split!r}: expected 'train' or 'validation'")
  held_out = split == "validation"
  return [line for i, line in enumerate(lines) if (i % VALIDATION_EVERY == 0) == held_out]


def parallel_lines(lang: str, split: str | None = None) -> list[str]:
  """The 100 parallel sentences of one language (line i is the same sentence in all 18)."""
  return _split(_read(sample_path(lang)), split)


def sample_lines(lang: str, split: str | None = None) -> list[str]:
  """All sample text of one language (the parallel sentences, then the treebank sentences);
  split is None (all), 'train' or 'validation'."""
  return _split(_read(sample_path(lang)) + _read(TREEBANK_DIR / f"{lang}.txt"), split)
