"""How good an instruction set is, per language (`polylm-self-instruct report FILE...`).

For Alpaca-format records ({"instruction", "input", "output"}, optionally "lang"), in JSONL or a
JSON list, one language per file unless the records say otherwise (the language is the record's
"lang", else the file's name: `th.jsonl` -> th):

- count, and exact duplicates (the same normalized instruction and input);
- diversity: each instruction's ROUGE-L with the most similar instruction before it in the same
  language (self-instruct's measure: low is diverse), its median and the share at or above the
  filter threshold 0.7;
- language purity: the shares of instructions and of outputs identified as the file's language
  (fastText language id with the generation filter's rule and minimum score; texts with under 10
  letters are not judged);
- instruction and output lengths (words; characters for zh, ja and th);
- the most frequent first words of instructions (the leading verb in most languages).

Writes report.md (a table per language) and two charts (ROUGE-L distributions, lengths).
"""

from __future__ import annotations

import collections
import json
import pathlib
import statistics
from typing import Any, Iterable

from polylm_jax.self_instruct import filters, rouge

# The generation filter's defaults: its ROUGE-L threshold and its language-id score.
THRESHOLD = filters.FilterConfig().rouge_threshold
MIN_LANGUAGE_SCORE = filters.FilterConfig().min_language_score


def read_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Records of a JSONL file or a JSON list; a bad line or record names the file and line."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 ({e})") from e
  if text.lstrip().startswith("["):
    try:
      records = json.loads(text)
    except ValueError as e:
      raise ValueError(f"{path}: not a JSON list ({e})") from e
    numbered = list(enumerate(records, 1))
  else:
    numbered = []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          numbered.append((n, json.loads(line)))
        except ValueError as e:
          raise ValueError(f"{path}:{n}: not JSON ({e})") from e
  out = []
  for n, record in numbered:
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
      raise ValueError(f"{path}:{n}: no 'instruction' string field")
    out.append(record)
  return out


def by_language(paths: Iterable[str | pathlib.Path]) -> dict[str, list[dict[str, Any]]]:
  out: dict[str, list[dict[str, Any]]] = {}
  for path in paths:
    stem = pathlib.Path(path).name.split(".")[0]
    for record in read_records(path):
      out.setdefault(str(record.get("lang") or stem), []).append(record)
  return dict(sorted(out.items()))


def _first_word(text: str, lang: str) -> str:
  if lang in rouge.CHARACTER_LANGUAGES:
    return "".join(rouge.tokenize(text, lang)[:2])
  words = rouge.tokenize(text, lang)
  return words[0] if words else ""


def language_stats(lang: str, records: list[dict[str, Any]], *, check_language: bool = True):
  """The numbers of one language's records (see the module docstring)."""
  keys = [filters.normalize(r["instruction"] + "\n" + str(r.get("input") or "")) for r in records]
  similarities = []
  pool = rouge.Pool(lang)
  for record in records:
    if len(pool):
      similarities.append(pool.max_similarity(record["instruction"]))
    pool.add(record["instruction"])
  purity: dict[str, float | None] = {"instruction": None, "output": None}
  if check_language:
    for field in purity:
      verdicts = [
        filters.in_language(str(r.get(field) or ""), lang, MIN_LANGUAGE_SCORE) for r in records
      ]
      judged = [v for v in verdicts if v is not None]
      if judged:
        purity[field] = sum(judged) / len(judged)
  lengths = [len(rouge.tokenize(r["instruction"], lang)) for r in records]
  outputs = [len(rouge.tokenize(str(r.get("output") or ""), lang)) for r in records]
  first = collections.Counter(_first_word(r["instruction"], lang) for r in records)
  return {
    "count": len(records),
    "duplicates": len(keys) - len(set(keys)),
    "rouge_l": similarities,
    "rouge_l_median": statistics.median(similarities) if similarities else None,
    "share_similar": (
      sum(s >= THRESHOLD for s in similarities) / len(similarities) if similarities else None
    ),
    "instruction_purity": purity["instruction"],
    "output_purity": purity["output"],
    "instruction_words": lengths,
    "output_words": outputs,
    "first_words": first.most_common(5),
  }


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def markdown(stats: dict[str, dict[str, Any]], sources: list[str]) -> str:
  lines = [
    "# Instruction data report",
    "",
    f"Files: {', '.join(sources)}. ROUGE-L: each instruction against the most similar one "
    f"before it in its language (lower is more diverse); similar: >= {THRESHOLD}. Lengths in "
    "words (characters for zh, ja, th). Purity: the share of instructions (outputs) identified "
    "as the language (texts under 10 letters not judged; a translation task's output is "
    "rightly in another language).",
    "",
    "| lang | count | duplicates | ROUGE-L median | similar | instruction purity "
    "| output purity | instruction (mean) | output (mean) | first words |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for lang, s in stats.items():
    median = "-" if s["rouge_l_median"] is None else f"{s['rouge_l_median']:.3f}"
    words = ", ".join(f"{w} ({n})" for w, n in s["first_words"])
    lines.append(
      f"| {lang} | {s['count']} | {s['duplicates']} | {median} | {_pct(s['share_similar'])} "
      f"| {_pct(s['instruction_purity'])} | {_pct(s['output_purity'])} "
      f"| {statistics.fmean(s['instruction_words']):.1f} "
      f"| {statistics.fmean(s['output_words']):.1f} | {words} |"
    )
  return "\n".join(lines) + "\n"


def charts(stats: dict[str, dict[str, Any]], out_dir: pathlib.Path) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  languages = list(stats)
  fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(languages)), 3.4))
  ax.boxplot([stats[x]["rouge_l"] or [0.0] for x in languages], tick_labels=languages)
  ax.axhline(THRESHOLD, linestyle="--", color="grey", linewidth=0.8)
  ax.set_ylabel("ROUGE-L with the most similar earlier instruction", fontsize="small")
  fig.tight_layout()
  _save(fig, plt, out_dir / "rouge_l.png")
  fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.0 * len(languages)), 3.4))
  for ax, key, title in zip(axes, ("instruction_words", "output_words"), ("instruction", "output")):
    ax.boxplot([stats[x][key] or [0] for x in languages], tick_labels=languages)
    ax.set_title(f"{title} length (words; characters for zh, ja, th)", fontsize="small")
  fig.tight_layout()
  _save(fig, plt, out_dir / "lengths.png")
  return ["rouge_l.png", "lengths.png"]


def _save(fig, plt, path: pathlib.Path) -> None:
  import io

  from polylm_jax.io import disk

  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  disk.atomic_write_bytes(path, png.getvalue())


def write(paths: list[str], out_dir: str | pathlib.Path, *, check_language: bool = True) -> str:
  """report.md, rouge_l.png and lengths.png in `out_dir`; returns the Markdown."""
  from polylm_jax.io import disk

  data = by_language(paths)
  if not data:
    raise ValueError(f"no records in {', '.join(paths)}")
  stats = {
    lang: language_stats(lang, records, check_language=check_language)
    for lang, records in data.items()
  }
  from polylm_jax.io import storage

  out = pathlib.Path(out_dir)
  storage.makedirs(str(out))
  text = markdown(stats, [pathlib.Path(p).name for p in paths])
  disk.atomic_write_text(out / "report.md", text)
  per_record = ("rouge_l", "instruction_words", "output_words")
  summary = {k: {n: v for n, v in s.items() if n not in per_record} for k, s in stats.items()}
  disk.atomic_write_text(out / "report.json", json.dumps(summary, indent=2, ensure_ascii=False))
  charts(stats, out)
  return text
