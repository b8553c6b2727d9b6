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

import numpy as np
import sentencepiece as spm

from polylm_jax.io import disk

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}


def weighted_sentences(
  texts: Mapping[str, Iterable[str]],
  weights: Mapping[str, float] | None = None,
  *,
  max_sentences: int = 10_000_000,
  seed: int = 0,
) -> list[str]:
  """The training sentences: each language's non-empty sentences times its weight, then a uniform
  sample of at most `max_sentences` of them all.

  A weight is a multiplier: 2 repeats every sentence of the language twice, 1.5 adds a random
  half once more, 0.5 keeps a random half, 0 drops the language. Repeating a language's sentences
  raises the frequency of its pieces, which is what earns them a place in the vocabulary: weights
  up-sample as well as down-sample, whatever the corpus size.
  """
  langs = sorted(texts)
  unknown = sorted(set(weights or {}) - set(langs))
  if unknown:
    raise ValueError(f"tokenizer weights name languages with no text: {unknown}")
  w = {lang: float((weights or {}).get(lang, 1.0)) for lang in langs}
  if any(v < 0 for v in w.values()) or not sum(w.values()):
    raise ValueError(f"tokenizer weights must be >= 0 and not all zero, got {w}")
  rng = random.Random(seed)
  sentences: list[str] = []
  for lang in langs:
    whole, part = int(w[lang]), w[lang] - int(w[lang])
    lines = [t for t in texts[lang] if t.strip()]
    sentences += lines * whole + [t for t in lines if rng.random() < part]
  if len(sentences) > max_sentences:
    sentences = rng.sample(sentences, max_sentences)
  return sentences


def train(
  texts: Mapping[str, Iterable[str]],
  model_path: str | pathlib.Path,
  vocab_size: int,
  **options,
) -> str:
  """Trains a BPE model (train_model) and writes it to `model_path` (.model)."""
  if pathlib.Path(model_path).suffix != ".model":
    raise ValueError(f"tokenizer model path must end with .model, got {model_path}")
  model = train_model(texts, vocab_size, **options)
  path = pathlib.Path(model_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  disk.atomic_write_bytes(path, model)
  return str(path)


def train_model(
  texts: Mapping[str, Iterable[str]],
  vocab_size: int,
  *,
  weights: Mapping[str, float] | None = None,
  max_sentences: int = 10_000_000,
  seed: int = 0,
  character_coverage: float = 0.9995,
  hard_vocab_limit: bool = True,
) -> bytes:
  """A serialized BPE model trained on per-language sentences (weighted: `weighted_sentences`)."""
  sentences = weighted_sentences(texts, weights, max_sentences=max_sentences, seed=seed)
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
  return model.getvalue()


def tokens_per_sentence(sp: spm.SentencePieceProcessor, lines: list[str]) -> float:
  return sum(len(ids) for ids in sp.encode(lines)) / max(len(lines), 1)


def balance(
  texts: Mapping[str, list[str]],
  dev: Mapping[str, list[str]],
  vocab_size: int,
  *,
  reference: str = "en",
  target: float = 1.10,
  max_reference_cost: float = 0.05,
  iterations: int = 12,
  gain: float = 3.0,
  seed: int = 0,
  character_coverage: float = 0.9995,
  log=print,
) -> tuple[bytes, dict[str, float], list[dict]]:
  """Chooses per-language weights so that no language of the parallel development set `dev` needs
  more than `target` times the reference language's tokens per sentence.

  Each iteration trains a model with the current weights, measures every dev language's ratio to
  the reference, and multiplies the weight of each language above the target by
  (ratio / target) ** gain. The reference language's tokens per sentence may rise by at most
  `max_reference_cost` over the unweighted model: when it would, the reference's own weight goes
  up instead. Stops at the target or after `iterations`. Returns (the last model, the weights,
  one table row per iteration).
  """
  if reference not in dev:
    raise ValueError(f"the development set needs the reference language {reference!r}")
  missing = sorted(set(dev) - set(texts))
  if missing:
    raise ValueError(f"development languages {missing} have no training text")
  weights = {lang: 1.0 for lang in texts}
  history: list[dict] = []
  base_reference = None
  model = b""
  for it in range(iterations + 1):
    model = train_model(
      texts,
      vocab_size,
      weights=weights,
      seed=seed,
      hard_vocab_limit=False,
      character_coverage=character_coverage,
    )
    sp = spm.SentencePieceProcessor(model_proto=model)
    tps = {lang: tokens_per_sentence(sp, lines) for lang, lines in dev.items()}
    base_reference = base_reference or tps[reference]
    ratios = {lang: tps[lang] / tps[reference] for lang in dev}
    worst = max(ratios, key=ratios.get)  # type: ignore[arg-type]
    cost = tps[reference] / base_reference - 1.0
    history.append(
      {
        "iteration": it,
        "weights": dict(weights),
        "ratios": ratios,
        "worst": worst,
        "reference_cost": cost,
      }
    )
    log(
      f"balance {it}: worst {worst} {ratios[worst]:.3f}, {reference} tokens/sentence "
      f"{cost:+.1%}; " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ratios.items()))
    )
    if ratios[worst] <= target or it == iterations:
      break
    for lang, ratio in ratios.items():
      if lang != reference and ratio > target:
        weights[lang] *= (ratio / target) ** gain
    if cost > max_reference_cost * 0.8:  # protect the reference before it passes its bound
      weights[reference] *= 1.0 + cost
  return model, weights, history


def load(model_path: str | pathlib.Path) -> spm.SentencePieceProcessor:
  path = pathlib.Path(model_path)
  if not path.is_file():
    raise FileNotFoundError(f"SentencePiece model not found: {path}")
  return spm.SentencePieceProcessor(model_file=str(path))


# Text that a lossless tokenizer gives back byte for byte: leading, doubled and trailing spaces,
# a tab, full-width and compatibility forms, combining marks, CJK, an emoji and a newline.
_BYTES_PROBE = "  Ｔｅｓｔ ﬁ  e\u0301\t日本語 ①  ع 🙂\n "


def token_bytes(sp: spm.SentencePieceProcessor, size: int | None = None) -> np.ndarray:
  """The UTF-8 bytes each token id stands for ([size] int32, ids past the tokenizer's are 0):
  a piece's text with "▁" as a space, 1 for a byte-fallback piece, 0 for control and unknown
  ids. Summed over a document's tokens: its text's bytes, for a tokenizer that encodes
  losslessly (see bytes_exact)."""
  size = size or sp.vocab_size()
  if size < sp.vocab_size():
    raise ValueError(f"token_bytes: size {size} < the tokenizer's {sp.vocab_size()} ids")
  table = np.zeros(size, np.int32)
  for i in range(sp.vocab_size()):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    table[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode())
  return table


def bytes_exact(sp: spm.SentencePieceProcessor, table: np.ndarray | None = None) -> bool:
  """Does token_bytes count a text's own bytes? True for a tokenizer with identity
  normalization, no dummy prefix and no whitespace folding (polylm-tokenizer's); another one
  counts the bytes of the text as it normalizes it. `table`: its token_bytes, if already made."""
  ids = sp.encode(_BYTES_PROBE)
  table = token_bytes(sp) if table is None else table
  return sp.decode(ids) == _BYTES_PROBE and int(table[ids].sum()) == len(_BYTES_PROBE.encode())


def train_sample_tokenizer(vocab_size: int = 4096) -> str:
  """Rebuilds the tokenizer shipped with the sample corpus (deterministic: one thread, fixed
  seed)."""
  from polylm_jax.data import sample

  texts = {lang: sample.sample_lines(lang) for lang in sample.LANGUAGES}
  return train(texts, sample.TOKENIZER_MODEL, vocab_size, hard_vocab_limit=False)


if __name__ == "__main__":
  print(train_sample_tokenizer())
