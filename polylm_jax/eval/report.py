"""Suite results as a Markdown table (task family x language, with the average per family) and a
bar chart per family, for one run or several side by side (e.g. before and after a stage switch)."""

from __future__ import annotations

import pathlib
from typing import Sequence


def _families(runs: Sequence[dict]) -> dict[str, list[str]]:
  """family -> its languages, in first-seen order across runs."""
  out: dict[str, list[str]] = {}
  for records in runs:
    for r in records.values():
      langs = out.setdefault(r["family"], [])
      if r["language"] not in langs:
        langs.append(r["language"])
  return out


# Metrics shown as they are (not as percentages): bits per byte (lower is better); sacreBLEU's
# BLEU and chrF++, already on a 0-100 scale.
_RAW = {
  "bpb": ("bits per byte, lower is better", "{:.3f}"),
  "bleu": ("BLEU", "{:.1f}"),
  "chrf": ("chrF++", "{:.1f}"),
}


def _unit(metric: str) -> tuple[float, str, str]:
  """(scale, unit, format) of a metric in tables and charts."""
  if metric in _RAW:
    return 1.0, *_RAW[metric]
  return 100.0, "%", "{:.1f}"


def _cell(records: dict, family: str, language: str) -> float | None:
  for r in records.values():
    if r["family"] == family and r["language"] == language:
      return _unit(r["metric"])[0] * r["value"]
  return None


def markdown(runs: Sequence[dict], labels: Sequence[str]) -> str:
  """One table per family: a row per run, a column per language, then the average (over the
  languages that run has)."""
  lines = []
  for family, languages in _families(runs).items():
    metric = next(r["metric"] for rs in runs for r in rs.values() if r["family"] == family)
    _, unit, fmt = _unit(metric)
    lines += [
      f"### {family} ({metric}, %)" if unit == "%" else f"### {family} ({unit})",
      "",
      "| run | " + " | ".join(languages) + " | avg |",
      "|---" * (len(languages) + 2) + "|",
    ]
    for records, label in zip(runs, labels):
      values = [_cell(records, family, lang) for lang in languages]
      have = [v for v in values if v is not None]
      avg = fmt.format(sum(have) / len(have)) if have else "-"
      lines.append(
        f"| {label} | "
        + " | ".join("-" if v is None else fmt.format(v) for v in values)
        + f" | {avg} |"
      )
    lines.append("")
  return "\n".join(lines)


def charts(runs: Sequence[dict], labels: Sequence[str], out_dir: str | pathlib.Path) -> list[str]:
  """A grouped bar chart per family (PNG), languages on the x axis, one bar per run."""
  import matplotlib

  matplotlib.use("Agg")
  import io

  import matplotlib.pyplot as plt

  from polylm_jax.io import storage

  written = []
  for family, languages in _families(runs).items():
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(languages) * max(1, len(runs))), 3.2))
    width = 0.8 / len(runs)
    for i, (records, label) in enumerate(zip(runs, labels)):
      values = [_cell(records, family, lang) or 0.0 for lang in languages]
      ax.bar(
        [x + i * width - 0.4 + width / 2 for x in range(len(languages))], values, width, label=label
      )
    ax.set_xticks(range(len(languages)), languages)
    metric = next(r["metric"] for rs in runs for r in rs.values() if r["family"] == family)
    unit = _unit(metric)[1]
    ax.set_ylabel(f"{metric} (%)" if unit == "%" else unit)
    ax.set_title(family)
    if len(runs) > 1:
      ax.legend(fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    storage.write_bytes(storage.join(out_dir, f"{family}.png"), png.getvalue())
    written.append(f"{family}.png")
  return written
