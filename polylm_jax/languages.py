"""The languages of a run: codes, display names and scripts.

A run's language set is configuration (gin `train.languages = @Languages()`, `Languages.codes`):
PolyLM's 18 by default, any other list for a run that adds or drops languages. It is a value: the
training command hands it to the tasks it registers, the curriculum, the train step (loss slots),
the loop (per-language metrics) and the checkpoint (which records it); nothing looks it up. A
language's tag is its position in the set plus one (0: untagged), carried per token through
packing so the trainer reports loss per language; a resume with another set fails.
Codes are ISO 639-1; the table below names many languages, `Languages.extra` names any other.
"""

from __future__ import annotations

import dataclasses

from polylm_jax.typecheck import check_fields

# code: (English name, script)
KNOWN: dict[str, tuple[str, str]] = {
  # PolyLM's 18
  "en": ("English", "Latin"),
  "zh": ("Chinese", "Han"),
  "ru": ("Russian", "Cyrillic"),
  "es": ("Spanish", "Latin"),
  "de": ("German", "Latin"),
  "fr": ("French", "Latin"),
  "ar": ("Arabic", "Arabic"),
  "pt": ("Portuguese", "Latin"),
  "it": ("Italian", "Latin"),
  "ja": ("Japanese", "Japanese"),
  "ko": ("Korean", "Hangul"),
  "th": ("Thai", "Thai"),
  "id": ("Indonesian", "Latin"),
  "vi": ("Vietnamese", "Latin"),
  "nl": ("Dutch", "Latin"),
  "pl": ("Polish", "Latin"),
  "tr": ("Turkish", "Latin"),
  "he": ("Hebrew", "Hebrew"),
  # others a multilingual run often adds
  "hi": ("Hindi", "Devanagari"),
  "bn": ("Bengali", "Bengali"),
  "ur": ("Urdu", "Arabic"),
  "fa": ("Persian", "Arabic"),
  "sw": ("Swahili", "Latin"),
  "uk": ("Ukrainian", "Cyrillic"),
  "cs": ("Czech", "Latin"),
  "ro": ("Romanian", "Latin"),
  "hu": ("Hungarian", "Latin"),
  "el": ("Greek", "Greek"),
  "bg": ("Bulgarian", "Cyrillic"),
  "sv": ("Swedish", "Latin"),
  "da": ("Danish", "Latin"),
  "fi": ("Finnish", "Latin"),
  "no": ("Norwegian", "Latin"),
  "ms": ("Malay", "Latin"),
  "tl": ("Tagalog", "Latin"),
  "ta": ("Tamil", "Tamil"),
  "te": ("Telugu", "Telugu"),
  "my": ("Burmese", "Myanmar"),
  "km": ("Khmer", "Khmer"),
  "lo": ("Lao", "Lao"),
  "kk": ("Kazakh", "Cyrillic"),
  "uz": ("Uzbek", "Latin"),
  "ka": ("Georgian", "Georgian"),
  "hy": ("Armenian", "Armenian"),
  "et": ("Estonian", "Latin"),
  "lt": ("Lithuanian", "Latin"),
  "lv": ("Latvian", "Latin"),
  "sk": ("Slovak", "Latin"),
  "sl": ("Slovenian", "Latin"),
  "hr": ("Croatian", "Latin"),
  "sr": ("Serbian", "Cyrillic"),
  "ca": ("Catalan", "Latin"),
  "eu": ("Basque", "Latin"),
  "am": ("Amharic", "Ethiopic"),
  "ne": ("Nepali", "Devanagari"),
  "mr": ("Marathi", "Devanagari"),
  "ml": ("Malayalam", "Malayalam"),
}
POLYLM = (
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
DEFAULT_CODES = POLYLM


def name_of(code: str, extra: dict[str, tuple[str, str]] | None = None) -> str:
  """A language's English name from the table (or `extra`); the code itself if neither has it."""
  return ({**KNOWN, **(extra or {})}.get(code) or (code, ""))[0]


@dataclasses.dataclass(frozen=True)
class Languages:
  """gin `Languages.codes = [...]` (order fixes the tags); `Languages.extra = {'xx': ('Name',
  'Script')}` for a code the table does not know."""

  codes: tuple[str, ...] = DEFAULT_CODES
  extra: dict[str, tuple[str, str]] | None = None

  def __post_init__(self):
    object.__setattr__(self, "codes", tuple(self.codes))
    check_fields(self)
    if not self.codes:
      raise ValueError("Languages.codes is empty")
    dupes = sorted({c for c in self.codes if self.codes.count(c) > 1})
    if dupes:
      raise ValueError(f"Languages.codes lists {dupes} more than once")
    unknown = [c for c in self.codes if c not in KNOWN and c not in (self.extra or {})]
    if unknown:
      raise ValueError(
        f"Languages.codes: {unknown} not in the language table; name them with "
        f"Languages.extra = {{'{unknown[0]}': ('Name', 'Script')}}"
      )

  @property
  def slots(self) -> int:
    """Per-language loss slots: one per language plus slot 0 for untagged tokens."""
    return len(self.codes) + 1

  def tag(self, code: str) -> int:
    if code not in self.codes:
      raise ValueError(
        f"language {code!r} is not in this run's language set {list(self.codes)} (Languages.codes)"
      )
    return self.codes.index(code) + 1

  def code(self, tag: int) -> str:
    return self.codes[tag - 1]

  def name(self, code: str) -> str:
    return name_of(code, self.extra)

  def script(self, code: str) -> str:
    return ({**KNOWN, **(self.extra or {})}.get(code) or ("", "unknown"))[1]


DEFAULT = Languages()  # PolyLM's 18; a run passes its own set wherever tags or names are needed
