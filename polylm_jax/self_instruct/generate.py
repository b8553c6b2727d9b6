"""The self-instruct loop (Wang et al. 2022; Alpaca; MultiAlpaca): prompt a chat model with a few
example tasks of a language, parse the new tasks it writes, keep those that pass the filters.

Output: <out_dir>/<lang>.jsonl, Alpaca records plus "lang", only ever appended to (each kept record
is one line, flushed and synced as it is kept), so the directory feeds
`InstructionCorpora.directory`
directly, and a killed run started again reads what it kept, counts it toward its targets and
refuses to keep it twice. <out_dir>/report.json: what each filter removed, per language, and the
requests made.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import random
import re
import time

from polylm_jax import languages
from polylm_jax.io import disk
from polylm_jax.self_instruct.client import ChatClient, MalformedResponse, RequestFailed
from polylm_jax.self_instruct.filters import Filters
from polylm_jax.typecheck import check_fields

PROMPT = """You are asked to come up with a set of {n} diverse task instructions written in \
{language}. These task instructions will be given to a language model and we will evaluate the \
model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The instructions, inputs and outputs must all be written in {language}.
3. The type of instructions should be diverse: open-ended generation, classification, editing, \
question answering, rewriting, summarization, reasoning, and so on.
4. A language model must be able to complete the instruction: it cannot see images, hear audio, \
open files or browse the internet.
5. Not all instructions need an input. When one does, the input is a concrete example of at most \
100 words; otherwise write "<noinput>".
6. The output is an appropriate response to the instruction and the input.

List of {n} tasks:
"""


def format_task(index: int, record: dict) -> str:
  given = record.get("input", "") or "<noinput>"
  return (
    f"###\n{index}. Instruction: {record['instruction']}\n{index}. Input:\n{given}\n"
    f"{index}. Output:\n{record['output']}\n"
  )


def build_prompt(lang: str, examples: list[dict], n: int) -> str:
  shown = "".join(format_task(i + 1, r) for i, r in enumerate(examples))
  return (
    PROMPT.format(n=n, language=languages.name_of(lang))
    + shown
    + f"###\n{len(examples) + 1}. Instruction:"
  )


_TASK = re.compile(
  r"^\s*\d+\.\s*Instruction:(.*?)\n\s*\d+\.\s*Input:\s*(.*?)\n\s*\d+\.\s*Output:"
  r"\s*(.*)$",
  re.DOTALL,
)


def parse_tasks(text: str, first_index: int) -> list[dict]:
  """Tasks of a completion (which continues after 'N. Instruction:'); unparseable chunks are
  returned as {} so the caller counts them."""
  chunks = re.split(r"\n?###\n?", f"{first_index}. Instruction:" + text)
  out: list[dict] = []
  for chunk in chunks:
    if not chunk.strip():
      continue
    m = _TASK.match(chunk)
    if not m:
      out.append({})
      continue
    instruction, given, output = (part.strip() for part in m.groups())
    out.append(
      {"instruction": instruction, "input": "" if given == "<noinput>" else given, "output": output}
    )
  return out


@dataclasses.dataclass(frozen=True)
class SelfInstructConfig:
  languages: tuple[str, ...]
  target_per_language: int = 1000
  max_requests: int = 100  # this invocation
  time_budget_s: float = 3600.0  # this invocation
  concurrency: int = 8
  examples_in_prompt: int = 3
  tasks_per_request: int = 8  # examples + new tasks asked for
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "languages", tuple(self.languages))
    check_fields(self)
    if self.tasks_per_request <= self.examples_in_prompt:
      raise ValueError("tasks_per_request must exceed examples_in_prompt (it includes them)")


class Output:
  """Append-only <out_dir>/<lang>.jsonl."""

  def __init__(self, out_dir: pathlib.Path, lang: str):
    self.path = out_dir / f"{lang}.jsonl"
    self.records = []
    if self.path.is_file():
      data = self.path.read_bytes()
      for line in data.decode("utf-8", errors="replace").splitlines():
        try:
          record = json.loads(line)
        except ValueError:
          continue  # a line cut short by a killed run: skipped here and by the readers
        if isinstance(record, dict) and "instruction" in record:
          self.records.append(record)
      if data and not data.endswith(b"\n"):
        with open(self.path, "ab") as f:  # end the cut line, so the next record starts clean
          f.write(b"\n")

  def append(self, record: dict) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.records.append(record)


def run(
  client: ChatClient,
  seeds: dict[str, list[dict]],
  out_dir: str | pathlib.Path,
  config: SelfInstructConfig,
  filters: Filters,
) -> dict:
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  outputs = {lang: Output(out_dir, lang) for lang in config.languages}
  for lang in config.languages:
    if not seeds.get(lang):
      raise ValueError(
        f"no seed task for language {lang!r} (seeds are JSONL records with "
        f"'lang', 'instruction', 'input' and 'output')"
      )
    for record in seeds[lang] + outputs[lang].records:
      filters.remember(lang, record["instruction"])
  before = {lang: len(o.records) for lang, o in outputs.items()}
  rng = random.Random(f"{config.seed}/{sum(before.values())}")  # a resumed run asks anew
  stats: collections.Counter = collections.Counter()
  began = time.monotonic()

  def wanted() -> list[str]:
    return [
      lang for lang in config.languages if len(outputs[lang].records) < config.target_per_language
    ]

  def submit(pool, lang):
    examples = rng.sample(seeds[lang], min(config.examples_in_prompt, len(seeds[lang])))
    prompt = build_prompt(lang, examples, config.tasks_per_request)
    stats["requests"] += 1
    return pool.submit(client.complete, prompt), lang, len(examples) + 1

  with concurrent.futures.ThreadPoolExecutor(config.concurrency) as pool:
    in_flight: list[tuple] = []
    turn = 0
    while True:
      open_langs = wanted()
      budget_left = (
        stats["requests"] < config.max_requests and time.monotonic() - began < config.time_budget_s
      )
      while open_langs and budget_left and len(in_flight) < config.concurrency:
        in_flight.append(submit(pool, open_langs[turn % len(open_langs)]))
        turn += 1
        budget_left = stats["requests"] < config.max_requests
      if not in_flight:
        break
      done, _ = concurrent.futures.wait(
        [f for f, _, _ in in_flight], return_when=concurrent.futures.FIRST_COMPLETED
      )
      for item in [i for i in in_flight if i[0] in done]:
        in_flight.remove(item)
        future, lang, first = item
        try:
          text = future.result()
        except MalformedResponse:
          stats["malformed_responses"] += 1
          continue
        except RequestFailed as e:
          stats["failed_requests"] += 1
          logging.warning("self-instruct: %s", e)
          continue
        for task in parse_tasks(text, first):
          if len(outputs[lang].records) >= config.target_per_language:
            break
          if filters.consider(lang, task):
            outputs[lang].append(dict(task, lang=lang))
  stats["retries"] = client.retries
  report = {
    "requests": dict(stats),
    "seconds": round(time.monotonic() - began, 1),
    "languages": {
      lang: {
        "kept_before": before[lang],
        "kept_now": len(outputs[lang].records),
        "decisions": dict(filters.counts[lang]),
      }
      for lang in config.languages
    },
  }
  disk.atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
  return report
