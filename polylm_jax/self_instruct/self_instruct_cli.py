"""`polylm-self-instruct`: grow an instruction set per language from seed tasks, through any
OpenAI-compatible chat endpoint (OpenAI, or `vllm serve` on an exported checkpoint).

  export OPENAI_API_KEY=...           # or none, for a local server
  polylm-self-instruct --seeds=seeds.jsonl --out_dir=data/self_instruct \\
      --base_url=http://localhost:8000/v1 --model=hf/my-polylm-chat \\
      --languages=th,vi,id --target_per_language=2000 --max_requests=500 --concurrency=8

Seeds: JSONL records {"lang", "instruction", "input", "output"}. Output: <out_dir>/<lang>.jsonl
(append-only; rerun the same command to continue a stopped run) and <out_dir>/report.json. Train on
it with `InstructionCorpora.directory = '<out_dir>'` (gin_configs/sft/multialpaca.gin).

  polylm-self-instruct report data/self_instruct/*.jsonl --out=data/self_instruct/quality

describes any Alpaca-format instruction set per language (count, duplicates, ROUGE-L diversity,
language purity, lengths, first words) in report.md and charts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

from polylm_jax import console


def read_seeds(path: str) -> dict[str, list[dict]]:
  seeds: dict[str, list[dict]] = {}
  for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    missing = [k for k in ("lang", "instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
      raise ValueError(f"{path}:{n}: missing field(s) {missing}")
    seeds.setdefault(record["lang"], []).append(record)
  return seeds


def report_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="polylm-self-instruct report",
    description="Describe instruction sets per language: count, duplicates, ROUGE-L diversity, "
    "language purity, lengths and first words, in report.md, report.json and two charts.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "files",
    nargs="+",
    help="Alpaca-format JSONL or JSON files (language: a record's 'lang', "
    "else the file name, th.jsonl -> th)",
  )
  parser.add_argument("--out", required=True, help="the report's directory")
  parser.add_argument("--no_language_check", action="store_true")
  args = parser.parse_args(argv)
  from polylm_jax.self_instruct import report

  try:
    print(report.write(args.files, args.out, check_language=not args.no_language_check))
  except (ValueError, FileNotFoundError) as e:
    print(f"polylm-self-instruct report: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["report"]:
    return report_main(argv[1:])
  parser = argparse.ArgumentParser(
    prog="polylm-self-instruct",
    description=console.summary(__doc__),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--seeds", required=True)
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--base_url", required=True, help="e.g. http://localhost:8000/v1")
  parser.add_argument("--model", required=True)
  parser.add_argument(
    "--api_key_env",
    default="OPENAI_API_KEY",
    help="environment variable holding the API key (unset: no key sent)",
  )
  parser.add_argument("--languages", default=None, help="comma-separated (default: the seeds')")
  parser.add_argument("--target_per_language", type=int, default=1000)
  parser.add_argument("--max_requests", type=int, default=100)
  parser.add_argument("--time_budget_s", type=float, default=3600.0)
  parser.add_argument("--concurrency", type=int, default=8)
  parser.add_argument("--examples_in_prompt", type=int, default=3)
  parser.add_argument("--tasks_per_request", type=int, default=8)
  parser.add_argument("--rouge_threshold", type=float, default=0.7)
  parser.add_argument("--no_language_check", action="store_true")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--timeout_s", type=float, default=120.0)
  parser.add_argument("--max_retries", type=int, default=5)
  parser.add_argument("--backoff_s", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from polylm_jax.self_instruct import client, filters, generate

  try:
    seeds = read_seeds(args.seeds)
    langs = args.languages.split(",") if args.languages else sorted(seeds)
    config = generate.SelfInstructConfig(
      tuple(langs),
      args.target_per_language,
      args.max_requests,
      args.time_budget_s,
      args.concurrency,
      args.examples_in_prompt,
      args.tasks_per_request,
      args.seed,
    )
    chat_client = client.ChatClient(
      args.base_url,
      args.model,
      os.environ.get(args.api_key_env),
      timeout_s=args.timeout_s,
      max_retries=args.max_retries,
      backoff_s=args.backoff_s,
      temperature=args.temperature,
    )
    checks = filters.Filters(
      filters.FilterConfig(
        rouge_threshold=args.rouge_threshold, check_language=not args.no_language_check
      )
    )
    report = generate.run(chat_client, seeds, args.out_dir, config, checks)
  except (ValueError, FileNotFoundError) as e:
    print(f"polylm-self-instruct: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report, indent=2, ensure_ascii=False))
  new = sum(v["kept_now"] - v["kept_before"] for v in report["languages"].values())
  requests = report["requests"]
  if requests.get("requests", 0) and not new:  # `self-instruct && train` must not go on
    print(
      f"polylm-self-instruct: nothing was generated: of {requests['requests']} requests "
      f"{requests.get('failed_requests', 0)} failed and {requests.get('malformed_responses', 0)} "
      f"gave malformed responses, and no task passed the filters (report: "
      f"{os.path.join(args.out_dir, 'report.json')})",
      file=sys.stderr,
    )
    return 1
  return 0


def console_main() -> None:
  sys.exit(main())
