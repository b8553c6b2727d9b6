"""SentencePiece BPE tokenizer with PolyLM's conventions.

unk 0 / bos 1 / eos 2, no pad piece (the feature converter pads with 0), digits split into single
tokens, byte fallback so any UTF-8 text encodes without <unk>.

Normalization rule: `identity` with no extra-whitespace removal and no dummy prefix, so
decode(encode(s)) == s for every string (no NFKC folding of full-width forms or compatibility
characters: the model sees text as written; normalise upstream if you want folding).
"""

from __future__ import annotations

import io
import pathlib
import random
from typing import Iterable, Mapping

import sentencepiece as spm

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}


def train(
  texts: Mapping[str, Iterable[str]],
  model_path: str | pathlib.Path,
  vocab_size: int,
  *,
  weights: Mapping[str, float] | None = None,
  max_sentences: int = 10_000_000,
  seed: int = 0,
  character_coverage: float = 0.9995,
  hard_vocab_limit: bool = True,
) -> str:
  """Trains a BPE model from per-language sentences and writes `<model_path>` (.model).

  Each language contributes up to `weights[lang] * max_sentences` sentences (weights normalised),
  sampled with `seed`, so memory stays bounded and low-resource languages get vocabulary.
  """
  langs = sorted(texts)
  unknown = sorted(set(weights or {}) - set(langs))
  if unknown:
    raise ValueError(f"tokenizer weights name languages with no text: {unknown}")
  w = {lang: float((weights or {}).get(lang, 1.0)) for lang in langs}
  if any(v < 0 for v in w.values()) or not sum(w.values()):
    raise ValueError(f"tokenizer weights must be >= 0 and not all zero, got {w}")
  total = sum(w.values())
  rng = random.Random(seed)
  sentences: list[str] = []
  for lang in langs:
    budget = int(max_sentences * w[lang] / total)
    # Reservoir sampling: bounded memory whatever the size of the source.
    kept: list[str] = []
    for i, line in enumerate(t for t in texts[lang] if t.strip()):
      if len(kept) < budget:
        kept.append(line)
      else:
        j = rng.randint(0, i)
        if j < budget:
          kept[j] = line
    sentences.extend(kept)
  model_path = pathlib.Path(model_path)
  if model_path.suffix != ".model":
    raise ValueError(f"tokenizer model path must end with .model, got {model_path}")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=model,
    model_type="bpe",
    vocab_size=vocab_size,
    character_coverage=character_coverage,
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    hard_vocab_limit=hard_vocab_limit,
    required_chars="0123456789",
    num_threads=1,
    max_sentence_length=16384,
    minloglevel=2,
    **SPECIAL_IDS,  # type: ignore[arg-type]
  )
  model_path.parent.mkdir(parents=True, exist_ok=True)
  model_path.write_bytes(model.getvalue())
  return str(model_path)


def load(model_path: str | pathlib.Path) -> spm.SentencePieceProcessor:
  path = pathlib.Path(model_path)
  if not path.is_file():
    raise FileNotFoundError(f"SentencePiece model not found: {path}")
  return spm.SentencePieceProcessor(model_file=str(path))


def train_sample_tokenizer(vocab_size: int = 4096) -> str:
  """Rebuilds the tokenizer shipped with the sample corpus (deterministic: one thread, fixed
  seed)."""
  from polylm_jax.data import sample

  texts = {lang: sample.sample_lines(lang) for lang in sample.LANGUAGES}
  return train(texts, sample.TOKENIZER_MODEL, vocab_size, hard_vocab_limit=False)


if __name__ == "__main__":
  print(train_sample_tokenizer())
