"""`--verify`: load an export with transformers (CPU) and compare it with the JAX model.

- logits on sample text in each of the 18 languages (the embedded sample corpus): max abs
  difference <= 1e-4 for float32 exports (bf16/fp16 exports: <= 0.1, their rounding);
- tokenizer: transformers' AutoTokenizer on the export gives the same ids as training framed the
  text with (BOS + the project's SentencePiece ids) on all sample sentences.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from polylm_jax import framing
from polylm_jax.data import sample
from polylm_jax.model import params as model_params

# What --verify needs beyond the package (pyproject.toml's `verify` extra).
NEEDS = ("torch", "transformers")


def missing_requirements() -> str | None:
  """None when --verify can run, else what to install (checked before anything is written)."""
  import importlib.util

  def absent(name: str) -> bool:
    try:
      return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # e.g. a module set to None in sys.modules: not importable
      return True

  missing = [name for name in NEEDS if absent(name)]
  if not missing:
    return None
  return (
    f"--verify loads the export with transformers, and {' and '.join(missing)} "
    f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'polylm-jax[verify]' "
    f"(or pip install torch transformers)"
  )


TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1, "float16": 1e-1}


@dataclasses.dataclass
class Report:
  lines: list[str] = dataclasses.field(default_factory=list)
  ok: bool = True

  def check(self, ok: bool, line: str) -> None:
    self.ok &= ok
    self.lines.append(("PASS " if ok else "FAIL ") + line)

  def text(self) -> str:
    return "\n".join(self.lines + [f"verify: {'PASS' if self.ok else 'FAIL'}"])


def params_from_reader(reader, cfg):
  """The full parameter tree, read leaf by leaf (fine for verification-sized use)."""
  abstract = model_params.abstract_params(cfg)
  return jax.tree_util.tree_map_with_path(
    lambda path, _: reader.read(tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)),
    abstract,
  )


def logits_differences(hf_dir, cfg, params, id_rows, *, rows_per_call: int = 8) -> list[float]:
  """Max abs difference between transformers' float32 logits of the directory and the JAX
  model's on each row of ids (the check behind export --verify and import --verify).

  The JAX model runs compiled once, on `rows_per_call` rows at a time, each right-padded to the
  longest row: attention is causal, so padding after a row's tokens leaves its logits as they
  are, and only the row's own positions are compared."""
  if not id_rows:
    return []
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model.eval()
  gdef = model_params.graphdef(cfg.replace(dtype="float32", attention_impl="xla"))
  forward = jax.jit(lambda p, ids: model_params.apply(gdef, p, ids))
  length = max(len(row) for row in id_rows)
  rows_per_call = min(rows_per_call, len(id_rows))
  out = []
  for start in range(0, len(id_rows), rows_per_call):
    rows = id_rows[start : start + rows_per_call]
    ids = np.zeros((rows_per_call, length), np.int32)  # every call the same shape
    for i, row in enumerate(rows):
      ids[i, : len(row)] = row
    want = np.asarray(forward(params, ids))
    for i, row in enumerate(rows):
      with torch.no_grad():
        got = model(torch.as_tensor([row], dtype=torch.long)).logits.numpy()[0]
      out.append(float(np.max(np.abs(got - want[i, : len(row)]))))
  return out


def verify_export(out_dir: str | pathlib.Path, reader, *, lines_per_language: int = 2) -> Report:
  import sentencepiece as spm
  import transformers

  out = pathlib.Path(out_dir)
  report = Report()
  cfg = reader.model_config
  dtype = transformers.AutoConfig.from_pretrained(out).dtype
  dtype = str(dtype).replace("torch.", "") if dtype is not None else "float32"
  sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  doc_framing = framing.from_meta(reader.meta)
  mismatched = [
    (lang, line)
    for lang in sample.LANGUAGES
    for line in sample.parallel_lines(lang)
    if hf_tok(line)["input_ids"] != doc_framing.prompt(sp.encode(line))
  ]
  report.check(
    not mismatched,
    f"tokenizer: transformers ids == training's framed ids on "
    f"{18 * len(sample.parallel_lines('en'))} sample sentences"
    + (f"; first mismatch {mismatched[0]}" if mismatched else ""),
  )
  tol = TOLERANCE.get(dtype, 1e-4)
  texts = [
    (lang, line)
    for lang in sample.LANGUAGES
    for line in sample.parallel_lines(lang)[:lines_per_language]
  ]
  rows = [doc_framing.prompt(sp.encode(line))[: cfg.max_length] for _, line in texts]
  diffs = logits_differences(out, cfg, params_from_reader(reader, cfg), rows)
  for (lang, line), diff in zip(texts, diffs):
    if diff > tol:
      report.check(False, f"logits [{lang}] max abs diff {diff:.2e} > {tol:g}: {line[:40]}")
  worst = max(diffs)
  report.check(
    worst <= tol,
    f"logits: max abs diff {worst:.2e} over 18 languages ({dtype} export, tolerance {tol:g})",
  )
  return report
