"""A balanced tokenizer vs plain SentencePiece BPE, measured on parallel sentences the balancing
never saw.

The Universal Dependencies text (`--ud_dir`, default the copy embedded in the package: 1,000
parallel PUD sentences in 15 languages plus nl, vi, he) is split: PUD lines 0-499 are the
development set the balancing measures, lines 500-999 the test set this script reports on, and
neither model is trained on the test lines. Prints, for the unweighted and the balanced model
(same vocabulary size): tokens per sentence and the ratio to English per test language, the worst
ratio, English's cost, the chosen weights, and whether decode(encode(s)) == s for every sentence
of the corpus.

  python bench/tokenizer_balance.py [--vocab_size 32000] [--target 1.10]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ud_dir", default=None, help="default: polylm_jax/data/sample/ud")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--target", type=float, default=1.10)
  parser.add_argument("--json", help="also write the figures here")
  args = parser.parse_args()
  import sentencepiece as spm

  from polylm_jax.data import sample, tokenizer

  ud = pathlib.Path(args.ud_dir or sample.TREEBANK_DIR)
  if not ud.is_dir():
    sys.exit(
      f"--ud_dir={ud}: not found (the Universal Dependencies sentences, one file per language)"
    )
  texts = {p.stem: p.read_text(encoding="utf-8").splitlines() for p in sorted(ud.glob("*.txt"))}
  parallel = sorted(lang for lang in sample.PUD_LANGUAGES if lang in texts)
  train = {lang: (lines[:500] if lang in parallel else lines) for lang, lines in texts.items()}
  dev = {lang: texts[lang][:500] for lang in parallel}
  test = {lang: texts[lang][500:1000] for lang in parallel}
  plain = spm.SentencePieceProcessor(
    model_proto=tokenizer.train_model(train, args.vocab_size, hard_vocab_limit=False)
  )
  model, weights, history = tokenizer.balance(
    train, dev, args.vocab_size, target=args.target, log=lambda line: print(line, flush=True)
  )
  balanced = spm.SentencePieceProcessor(model_proto=model)
  rows, summary = [], {}
  for name, sp in (("unweighted", plain), ("balanced", balanced)):
    tps = {lang: tokenizer.tokens_per_sentence(sp, lines) for lang, lines in test.items()}
    ratios = {lang: tps[lang] / tps["en"] for lang in test}
    worst = max(ratios, key=ratios.get)
    round_trip = all(sp.decode(sp.encode(s)) == s for lines in texts.values() for s in lines)
    summary[name] = {
      "tokens_per_sentence": tps,
      "ratios": ratios,
      "worst": worst,
      "round_trip": round_trip,
    }
    rows.append((name, tps, ratios))
  print(f"\ntest set: PUD lines 500-999 ({len(test)} languages), vocabulary {args.vocab_size}")
  print(
    f"{'lang':>5} | {'unweighted tok/sent':>19} {'vs en':>6} | {'balanced tok/sent':>17} "
    f"{'vs en':>6} | weight"
  )
  for lang in test:
    print(
      f"{lang:>5} | {rows[0][1][lang]:19.1f} {rows[0][2][lang]:6.3f} | {rows[1][1][lang]:17.1f} "
      f"{rows[1][2][lang]:6.3f} | {weights.get(lang, 1.0):.2f}"
    )
  cost = (
    summary["balanced"]["tokens_per_sentence"]["en"]
    / summary["unweighted"]["tokens_per_sentence"]["en"]
    - 1
  )
  for name in ("unweighted", "balanced"):
    s = summary[name]
    print(
      f"{name}: worst ratio {s['ratios'][s['worst']]:.3f} ({s['worst']}); decode(encode(s)) == s "
      f"for every corpus sentence: {s['round_trip']}"
    )
  print(f"English tokens per sentence, balanced vs unweighted: {cost:+.1%}")
  print("weights: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(weights.items())))
  if args.json:
    pathlib.Path(args.json).write_text(
      json.dumps(
        {"summary": summary, "weights": weights, "english_cost": cost, "iterations": history},
        indent=2,
      )
    )


if __name__ == "__main__":
  main()
