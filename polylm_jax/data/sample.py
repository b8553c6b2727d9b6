"""The embedded sample corpus: 100 parallel sentences in each of PolyLM's 18 languages.

Line i of every file says the same thing (see `sample/README.md` for provenance). Every tenth line
(i % 10 == 0) is held out as the validation split.
"""

from __future__ import annotations

import pathlib

LANGUAGES = (
  "en",
  "zh",
  "ru",
  "es",
  "de",
  "fr",
  "ar",
  "pt",
  "it",
  "ja",
  "ko",
  "th",
  "id",
  "vi",
  "nl",
  "pl",
  "tr",
  "he",
)
SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sample"
TOKENIZER_MODEL = SAMPLE_DIR / "sample_sp.model"
VALIDATION_EVERY = 10


def sample_path(lang: str) -> pathlib.Path:
  if lang not in LANGUAGES:
    raise ValueError(f"language {lang!r} is not in the sample corpus; it has {LANGUAGES}")
  return SAMPLE_DIR / f"{lang}.txt"


def sample_lines(lang: str, split: str | None = None) -> list[str]:
  """The sample sentences of one language; split is None (all), 'train' or 'validation'."""
  lines = [
    line for line in sample_path(lang).read_text(encoding="utf-8").splitlines() if line.strip()
  ]
  if split is None:
    return lines
  if split not in ("train", "validation"):
    raise ValueError(f"split {split!r}: expected 'train' or 'validation'")
  held_out = split == "validation"
  return [line for i, line in enumerate(lines) if (i % VALIDATION_EVERY == 0) == held_out]
