"""The `heldout` family of polylm-eval: bits per UTF-8 byte of held-out text, per language.

Per-token loss depends on the tokenizer (a larger vocabulary has fewer, harder tokens); bits per
byte does not, so runs with different vocabularies compare. Definition: each document (a line
of text) is framed as in training, BOS + its tokens + EOS; the log-probabilities of every
predicted token (the text's tokens and the EOS) are summed, in bits, over all documents of a
language, and divided by the summed UTF-8 bytes of the documents' text. A document longer than
the model's context is scored in consecutive windows, each without the earlier ones' context
(as a training row boundary cuts it).

Text comes from the embedded sample corpus's validation split (`--heldout=sample`, the held-out
split of the quickstart's run) or a directory of `<lang>.txt` files (`--heldout=DIR`, one
document per non-empty line).
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Sequence

from polylm_jax import framing

FAMILY = "heldout"
METRIC = "bpb"


def task_name(language: str) -> str:
  return f"{FAMILY}_{language}"


def check_source(source: str) -> None:
  """`source` is 'sample' or a directory (checked before any model is loaded)."""
  if source != "sample" and not pathlib.Path(source).is_dir():
    raise FileNotFoundError(
      f"--heldout={source}: neither 'sample' nor a directory of <lang>.txt files"
    )


def documents(source: str, languages: Sequence[str]) -> dict[str, list[str]]:
  """{language: documents} of `languages` that `source` has ('sample', or a directory of
  <lang>.txt files); a language it lacks is left out."""
  check_source(source)
  if source == "sample":
    from polylm_jax.data import sample

    return {
      lang: sample.sample_lines(lang, "validation")
      for lang in languages
      if lang in sample.LANGUAGES
    }
  directory = pathlib.Path(source)
  out = {}
  for lang in languages:
    path = directory / f"{lang}.txt"
    if path.is_file():
      try:
        lines = path.read_text(encoding="utf-8").splitlines()
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
      docs = [line for line in lines if line.strip()]
      if not docs:
        raise ValueError(f"{path}: no non-empty line to evaluate")
      out[lang] = docs
  return out


def windows(ids: Sequence[int], limit: int) -> list[tuple[list[int], list[int], int]]:
  """Scoring items of one document (BOS + ids + EOS): inputs, targets, first scored index."""
  full = [framing.BOS_ID, *ids, framing.EOS_ID]
  out = []
  for begin in range(0, len(full) - 1, limit):
    end = min(begin + limit, len(full) - 1)
    out.append((full[begin:end], full[begin + 1 : end + 1], 0))
  return out


def score(scorer, sp, docs: Sequence[str]) -> dict[str, float]:
  """bits per byte of `docs` and what it is made of."""
  items = []
  for text in docs:
    items += windows(sp.encode(text), scorer.config.max_length)
  nats = -sum(s.logprob for s in scorer.score(items))
  tokens = sum(len(targets) for _, targets, _ in items)
  text_bytes = sum(len(text.encode("utf-8")) for text in docs)
  return {
    "bpb": nats / math.log(2) / text_bytes,
    "nats_per_token": nats / tokens,
    "bits": nats / math.log(2),
    "bytes": text_bytes,
    "tokens": tokens,
    "documents": len(docs),
  }


def evaluate(scorer, sp, docs_by_language: dict[str, list[str]]) -> dict[str, dict]:
  """{task: record} for each language, in the suite's record format (eval/suite.py)."""
  records = {}
  for lang, docs in docs_by_language.items():
    began = time.perf_counter()
    metrics = score(scorer, sp, docs)
    records[task_name(lang)] = dict(
      task=task_name(lang),
      family=FAMILY,
      language=lang,
      metric=METRIC,
      value=metrics["bpb"],
      metrics=metrics,
      num_fewshot=0,
      limit=None,
      seconds=time.perf_counter() - began,
      requests=len(docs),
    )
  return records
