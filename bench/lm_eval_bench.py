"""lm-eval throughput: the `polylm_jax` model vs lm-eval's `hf` model on the export.

`--kind loglikelihood` (default): both score the same distinct requests (sentences of the embedded
sample corpus in all 18 languages as contexts and continuations), with the same batch size, after
a warm-up pass over all of them; requests/s of each (the best of `--repeats` rounds, each round
running both models in turn), the ratio (and its range over the rounds), and the largest
difference between their log-likelihoods.
`--kind generate_until`: both answer the same generation requests (the shipped translation
tasks' prompt around `--sentences` sample sentences of the 17 non-English languages, stop at a
newline, at most `--max_gen_toks` tokens, greedy); requests/s, the ratio, and how many of the
generated texts are identical.
Random weights of the chosen preset (exported to the GPT-2 layout) and the embedded tokenizer
(for generate_until the model's vocabulary is the tokenizer's, so every generated id decodes).

  python bench/lm_eval_bench.py                                  # `small`, float32, CPU
  python bench/lm_eval_bench.py --kind generate_until --requests 64
  python bench/lm_eval_bench.py --preset polylm_1.7b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


class _Request:
  def __init__(self, args):
    self.args = args


def requests(n: int) -> list[_Request]:
  """n distinct (context, continuation) pairs from the embedded sample corpus (all languages);
  distinct, because lm-eval's hf model scores identical requests once."""
  from polylm_jax.data import sample

  lines = [line for lang in sample.LANGUAGES for line in sample.sample_lines(lang)]
  out = []
  for i in range(n):
    context = lines[i % len(lines)] + " " + lines[(7 * i + 3) % len(lines)]
    out.append(_Request((context, " " + lines[(13 * i + 5) % len(lines)][:30])))
  assert len({r.args for r in out}) == n
  return out


def generation_requests(n: int, max_gen_toks: int, sentences: int = 1) -> list[_Request]:
  """n distinct translation-shaped requests, as the shipped translation tasks ask them
  (eval/translation.py's prompt around `sentences` sample sentences, stop at a newline)."""
  from polylm_jax.data import sample
  from polylm_jax.eval import translation

  languages = [lang for lang in sample.LANGUAGES if lang != "en"]
  kwargs = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
  out = []
  for i in range(n):
    lang = languages[i % len(languages)]
    lines = sample.sample_lines(lang)
    text = " ".join(lines[(i * 7 + j) % len(lines)] for j in range(sentences))
    out.append(_Request((translation.prompt(lang, "en", text), dict(kwargs))))
  assert len({r.args[0] for r in out}) == n
  return out


def timed(lms: dict, reqs, repeats: int, kind: str = "loglikelihood") -> dict[str, list[float]]:
  """Requests/s of each of `lms` in each of `repeats` rounds, after a warm-up pass of each that
  compiles every shape once. A round runs every model once in turn, so that a slow spell of a
  shared machine falls on both sides rather than on whichever happened to be running."""
  runs = {name: getattr(lm, kind) for name, lm in lms.items()}
  for run in runs.values():
    run(reqs, disable_tqdm=True)
  rates: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run(reqs, disable_tqdm=True)
      rates[name].append(len(reqs) / (time.perf_counter() - start))
  return rates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--kind", default="loglikelihood", choices=["loglikelihood", "generate_until"]
  )
  parser.add_argument("--preset", default="small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--requests", type=int, default=None, help="480 scored, 64 generated")
  parser.add_argument("--max_gen_toks", type=int, default=64)
  parser.add_argument(
    "--sentences", type=int, default=1, help="source sentences per generation request"
  )
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--device", default="cpu")
  parser.add_argument(
    "--repeats", type=int, default=3, help="timed rounds (each model once); the best counts"
  )
  args = parser.parse_args()
  import jax
  import numpy as np
  from decode_bench import cpu_name
  from lm_eval.models.huggingface import HFLM

  from polylm_jax.config import PRESETS
  from polylm_jax.data import sample
  from polylm_jax.eval.lm_eval_model import PolyLMJax
  from polylm_jax.export import hf_export, tokenizer_files
  from polylm_jax.model import params as P

  cfg = PRESETS[args.preset].replace(dtype=args.dtype, attention_impl="auto")
  generating = args.kind == "generate_until"
  if generating:  # generated ids are decoded to text: the vocabulary is the tokenizer's
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(sample.TOKENIZER_MODEL)).vocab_size()
    cfg = cfg.replace(vocab_size=vocab)
  params = jax.device_get(P.init_params(cfg, 0))
  n = args.requests or (64 if generating else 480)
  reqs = generation_requests(n, args.max_gen_toks, args.sentences) if generating else requests(n)
  print(
    f"lm-eval {args.kind} benchmark: {cfg.name} ({args.dtype}, vocabulary {cfg.vocab_size}), "
    f"{len(reqs)} requests, batch {args.batch_size}"
    + (
      f", {args.sentences} sentence(s) each, up to {args.max_gen_toks} new tokens"
      if generating
      else ""
    )
    + f"; jax {jax.__version__} on {jax.devices()[0].device_kind}; "
    f"CPU {cpu_name()} ({os.cpu_count()} cores)"
  )
  with tempfile.TemporaryDirectory() as tmp:
    out = hf_export.export_params(params, cfg, f"{tmp}/hf", dtype=args.dtype)
    tokenizer_files.write_tokenizer(out, sample.TOKENIZER_MODEL.read_bytes(), cfg.max_length)
    ours = PolyLMJax(
      hf_dir=str(out), batch_size=args.batch_size, dtype=args.dtype, max_gen_toks=args.max_gen_toks
    )
    ours.show_progress = False
    theirs_lm = HFLM(
      pretrained=str(out),
      dtype=args.dtype,
      batch_size=args.batch_size,
      device=args.device,
    )
    rates = timed({"ours": ours, "theirs": theirs_lm}, reqs, args.repeats, args.kind)
    mine, theirs = max(rates["ours"]), max(rates["theirs"])
    rounds = [a / b for a, b in zip(rates["ours"], rates["theirs"])]
    if generating:
      a, b = (
        ours.generate_until(reqs, disable_tqdm=True),
        theirs_lm.generate_until(reqs, disable_tqdm=True),
      )
      same = f"identical texts {sum(x == y for x, y in zip(a, b))} of {len(reqs)}"
    else:
      a = [x for x, _ in ours.loglikelihood(reqs[:32], disable_tqdm=True)]
      b = [x for x, _ in theirs_lm.loglikelihood(reqs[:32], disable_tqdm=True)]
      same = f"max |loglik diff| on 32 requests {np.max(np.abs(np.subtract(a, b))):.2e}"
    print(
      f"polylm_jax {mine:8.1f} requests/s | hf {theirs:8.1f} requests/s | ratio "
      f"{mine / theirs:.2f}x (rounds {min(rounds):.2f}-{max(rounds):.2f}x) | {same}"
    )


if __name__ == "__main__":
  main()
