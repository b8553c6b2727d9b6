"""`polylm-tokenizer`: train a PolyLM-style SentencePiece model, and report compression by language.

  polylm-tokenizer train --dir corpus/ --input th=th.jsonl --weight th=3 \\
      --vocab_size 256000 --out tok/polylm.model
  polylm-tokenizer balance --dir corpus/ --dev_dir parallel_dev/ --vocab_size 256000 \\
      --out tok/balanced.model          # + tok/balanced.model.balance.json
  polylm-tokenizer report --model tok/polylm.model [--model other.model] \\
      --dir parallel_test/ [--csv report.csv]

`train` weighs languages by multiplying their sentences (`--weight th=3` repeats Thai three times);
`balance` chooses those weights itself: it trains, measures each language's tokens per sentence
against English on a parallel development set, up-weights the languages above `--target` and
repeats, keeping English's cost within `--max_reference_cost` (docs/data.md). `report` prints, per
language: sentences, UTF-8 bytes per token, tokens per sentence and the ratio of tokens per
sentence to English (meaningful on a parallel corpus: the same sentences in every language), for
one model or side by side for two.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import pathlib
import sys
from typing import Iterator

from polylm_jax import console
from polylm_jax.data import tokenizer
from polylm_jax.io import disk


def _pairs(items: list[str], flag: str) -> dict[str, str]:
  out = {}
  for item in items:
    if "=" not in item:
      raise SystemExit(f"{flag} {item!r}: expected LANG=VALUE")
    lang, value = item.split("=", 1)
    out[lang] = value
  return out


def read_lines(pattern: str, text_field: str = "text") -> Iterator[str]:
  """Lines of text files, or a field of JSONL records, from every file the glob matches."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise SystemExit(f"input {pattern!r} matches no file")
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if path.endswith(".jsonl"):
          text = json.loads(line).get(text_field, "")
        else:
          text = line.rstrip("\n")
        if text.strip():
          yield text


def report_rows(model_paths: list[str], inputs: dict[str, str]) -> list[dict]:
  models = [tokenizer.load(p) for p in model_paths]
  texts = {lang: list(read_lines(path)) for lang, path in sorted(inputs.items())}
  rows = []
  for lang, lines in texts.items():
    row: dict = {
      "language": lang,
      "sentences": len(lines),
      "utf8_bytes": sum(len(line.encode("utf-8")) for line in lines),
    }
    for i, sp in enumerate(models):
      tokens = sum(len(ids) for ids in sp.encode(lines))
      row[f"tokens_{i}"] = tokens
      row[f"bytes_per_token_{i}"] = row["utf8_bytes"] / max(tokens, 1)
      row[f"tokens_per_sentence_{i}"] = tokens / max(len(lines), 1)
    rows.append(row)
  english = next((r for r in rows if r["language"] == "en"), None)
  for row in rows:
    for i in range(len(models)):
      base = english[f"tokens_per_sentence_{i}"] if english else None
      row[f"ratio_to_en_{i}"] = row[f"tokens_per_sentence_{i}"] / base if base else float("nan")
  return rows


def format_table(rows: list[dict], model_paths: list[str]) -> str:
  out = ["models: " + "  ".join(f"[{i}] {p}" for i, p in enumerate(model_paths))]
  head = f"{'lang':>4} {'sents':>6}"
  for i in range(len(model_paths)):
    head += f" | {f'B/tok[{i}]':>9} {f'tok/sent[{i}]':>12} {f'vs en[{i}]':>9}"
  out += [head, "-" * len(head)]
  for r in rows:
    line = f"{r['language']:>4} {r['sentences']:>6}"
    for i in range(len(model_paths)):
      line += (
        f" | {r[f'bytes_per_token_{i}']:9.2f} {r[f'tokens_per_sentence_{i}']:12.1f} "
        f"{r[f'ratio_to_en_{i}']:9.2f}"
      )
    out.append(line)
  return "\n".join(out)


def _texts(args) -> dict[str, list[str]]:
  inputs = _pairs(args.input, "--input")
  if args.dir:
    for path in sorted(pathlib.Path(args.dir).glob("*.txt")):
      inputs.setdefault(path.stem, str(path))
  texts = {lang: list(read_lines(pattern, args.text_field)) for lang, pattern in inputs.items()}
  if args.sample:  # the embedded corpus's training split; --input/--dir languages replace it
    from polylm_jax.data import sample

    for lang in sample.LANGUAGES:
      texts.setdefault(lang, sample.sample_lines(lang, "train"))
  if not texts:
    raise SystemExit(f"{args.command} needs --dir, --input LANG=GLOB or --sample")
  return texts


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="polylm-tokenizer", description=console.summary(__doc__))
  sub = parser.add_subparsers(dest="command", required=True)
  fmt = argparse.ArgumentDefaultsHelpFormatter
  t = sub.add_parser("train", help="train a SentencePiece BPE model", formatter_class=fmt)
  b = sub.add_parser(
    "balance",
    formatter_class=fmt,
    help="train a model with per-language weights chosen on a parallel dev set",
  )
  for p in (t, b):
    p.add_argument("--dir", help="a directory of <lang>.txt files, one sentence per line")
    p.add_argument(
      "--input",
      action="append",
      default=[],
      help="LANG=GLOB of text or .jsonl files (repeatable; adds to or overrides --dir)",
    )
    p.add_argument("--text_field", default="text", help="JSONL field holding the text")
    p.add_argument(
      "--sample",
      action="store_true",
      help="the embedded 18-language corpus's training split (its held-out lines left out)",
    )
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument(
      "--character_coverage",
      type=float,
      default=0.9995,
      help="share of characters with pieces of their own (the rest as bytes); a small "
      "vocabulary over many scripts needs less",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="path of the .model file")
  t.add_argument(
    "--weight",
    action="append",
    default=[],
    help="LANG=WEIGHT (repeatable): a multiplier of the language's sentences; 2 "
    "repeats each twice, 0.5 keeps half (default 1)",
  )
  t.add_argument("--weights_from", help="a <model>.balance.json written by `balance`")
  t.add_argument(
    "--max_sentences",
    type=int,
    default=10_000_000,
    help="cap on training sentences after weighting (a uniform sample)",
  )
  b.add_argument(
    "--dev_dir",
    required=True,
    help="parallel development set: <lang>.txt files whose line i is one sentence",
  )
  b.add_argument("--reference", default="en", help="the language the ratios are measured against")
  b.add_argument(
    "--target", type=float, default=1.10, help="largest tokens-per-sentence ratio to the reference"
  )
  b.add_argument(
    "--max_reference_cost",
    type=float,
    default=0.05,
    help="largest rise of the reference's tokens per sentence",
  )
  b.add_argument("--iterations", type=int, default=12)
  r = sub.add_parser(
    "report", help="compression per language, one or two models", formatter_class=fmt
  )
  r.add_argument("--model", action="append", required=True, help="a .model (repeatable, <= 2)")
  r.add_argument("--input", action="append", default=[], help="LANG=PATH (repeatable)")
  r.add_argument("--dir", help="a directory of <lang>.txt files (e.g. a parallel corpus)")
  r.add_argument("--csv", help="also write the table as CSV")
  return parser


def _train(args) -> int:
  weights = {k: float(v) for k, v in _pairs(args.weight, "--weight").items()}
  if args.weights_from:
    weights = {**json.loads(pathlib.Path(args.weights_from).read_text())["weights"], **weights}
  try:
    path = tokenizer.train(
      _texts(args),
      args.out,
      args.vocab_size,
      weights=weights,
      max_sentences=args.max_sentences,
      seed=args.seed,
      character_coverage=args.character_coverage,
    )
  except RuntimeError as e:  # SentencePiece's own check, e.g. too few pieces for the characters
    raise SystemExit(f"polylm-tokenizer train: SentencePiece refused: {e}") from e
  print(f"wrote {path} ({tokenizer.load(path).vocab_size()} pieces)")
  return 0


def _balance(args) -> int:
  dev = {
    p.stem: [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    for p in sorted(pathlib.Path(args.dev_dir).glob("*.txt"))
  }
  model, weights, history = tokenizer.balance(
    _texts(args),
    dev,
    args.vocab_size,
    reference=args.reference,
    target=args.target,
    max_reference_cost=args.max_reference_cost,
    iterations=args.iterations,
    seed=args.seed,
    character_coverage=args.character_coverage,
  )
  disk.atomic_write_bytes(args.out, model)
  record = {
    "weights": weights,
    "target": args.target,
    "reference": args.reference,
    "iterations": history,
  }
  disk.atomic_write_text(args.out + ".balance.json", json.dumps(record, indent=2))
  print(
    f"wrote {args.out} and {args.out}.balance.json; weights: "
    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(weights.items()))
  )
  return 0


def _report(args) -> int:
  if len(args.model) > 2:
    raise SystemExit("report compares at most two models")
  inputs = _pairs(args.input, "--input")
  if args.dir:
    inputs.update({p.stem: str(p) for p in sorted(pathlib.Path(args.dir).glob("*.txt"))})
  if not inputs:
    raise SystemExit("report needs --dir or --input LANG=PATH")
  rows = report_rows(args.model, inputs)
  print(format_table(rows, args.model))
  if args.csv:
    with open(args.csv, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return {"train": _train, "balance": _balance, "report": _report}[args.command](args)


def console_main() -> None:
  sys.exit(main())
