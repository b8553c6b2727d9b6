"""Self-instruct filter throughput: candidate instructions per second through every filter,
ROUGE-L included, against a pool of 50,000 kept instructions per language.

Pool and candidates are random word (or, for th/zh/ja, character) sequences of 6-20 tokens drawn
from the embedded corpus's vocabulary, so most candidates pass to the ROUGE-L stage. Compare the
figure with the endpoint's rate (instructions per second it writes): filtering must never be the
bottleneck.

  python bench/self_instruct_filter_bench.py [--pool 50000] [--candidates 300]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from decode_bench import cpu_name


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pool", type=int, default=50_000)
  parser.add_argument("--candidates", type=int, default=300)
  parser.add_argument("--languages", default="en,th,ru")
  args = parser.parse_args()
  from polylm_jax.data import sample
  from polylm_jax.self_instruct import filters, rouge

  print(
    f"self-instruct filters vs a pool of {args.pool:,}; CPU {cpu_name()} ({os.cpu_count()} cores)"
  )
  for lang in args.languages.split(","):
    chars = lang in rouge.CHARACTER_LANGUAGES
    units = [u for line in sample.sample_lines(lang) for u in (line if chars else line.split())]
    joiner = "" if chars else " "
    rng = random.Random(0)
    make = lambda: joiner.join(rng.choice(units) for _ in range(rng.randint(6, 20)))
    checks = filters.Filters(filters.FilterConfig(check_language=False))
    start = time.perf_counter()
    for _ in range(args.pool):
      checks.remember(lang, make())
    built = time.perf_counter() - start
    candidates = [{"instruction": make(), "output": make()} for _ in range(args.candidates)]
    start = time.perf_counter()
    for c in candidates:
      checks.consider(lang, c)
    rouge_rate = args.candidates / (time.perf_counter() - start)
    checks = filters.Filters()  # with the language-id check too
    for _ in range(50):
      checks.remember(lang, make())
    start = time.perf_counter()
    for c in candidates:
      checks.reason(lang, dict(c, instruction=sample.sample_lines(lang)[0]))
    lid_rate = args.candidates / (time.perf_counter() - start)
    print(
      f"{lang}: pool built in {built:.1f} s; {rouge_rate:,.0f} candidates/s through all "
      f"filters but language id; language id alone {lid_rate:,.0f}/s"
    )


if __name__ == "__main__":
  main()
