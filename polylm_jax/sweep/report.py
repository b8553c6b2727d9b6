"""A sweep's comparison report: `<sweep dir>/report/report.md` and its PNG charts.

- held-out bits per byte per arm (rows: arms, mean over seeds with the spread; columns: English,
  the non-English mean, then each language), from each arm's polylm-eval `heldout` results;
- the change against the baseline arm, seed by seed (arms share their seeds), each marked when
  it is within seed noise (|mean change| <= 2 x the standard deviation of the per-seed changes;
  with one seed there is no estimate of the noise, and the report says so);
- learning curves per language (`val_bpb/<lang>` of each arm's held-out evaluations, mean over
  seeds) with the curriculum's stage boundaries marked;
- the other benchmark results per arm.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any, Sequence

from polylm_jax.io import storage
from polylm_jax.sweep import runner, spec

NOISE_FACTOR = 2.0  # a change within NOISE_FACTOR x the seed standard deviation is noise
NON_ENGLISH = "non-en mean"


def _results(sweep_dir: str, arm: spec.Arm) -> dict[str, dict] | None:
  path = storage.join(runner.eval_dir(sweep_dir, arm), "results.json")
  return json.loads(storage.read_text(path))["tasks"] if storage.exists(path) else None


def _curve(sweep_dir: str, arm: spec.Arm) -> list[dict[str, Any]]:
  path = storage.join(runner.arm_dir(sweep_dir, arm), "eval_metrics.jsonl")
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _stage_starts(sweep_dir: str, arm: spec.Arm) -> list[int]:
  """The curriculum's stage start steps after 0, from the arm's newest checkpoint."""
  from polylm_jax.checkpoint.on_disk import complete_steps

  workdir = runner.arm_dir(sweep_dir, arm)
  steps = complete_steps(workdir) if storage.isdir(workdir) else []
  if not steps:
    return []
  meta = json.loads(
    storage.read_text(storage.join(workdir, "checkpoints", str(steps[-1]), "meta", "metadata"))
  )
  table = meta.get("curriculum") or ""
  return [int(m.group(1)) for m in re.finditer(r" from step (\d+):", table) if int(m.group(1))]


def _spread(values: Sequence[float]) -> tuple[float, float | None]:
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else None)


def collect(sweep: spec.Sweep, sweep_dir: str) -> dict[str, Any]:
  """Per arm group: bpb per language (and the non-English mean) for each seed; benchmark values;
  curves. Arms without results yet are listed as missing."""
  groups: dict[str, dict[str, Any]] = {}
  missing = []
  for arm in spec.arms(sweep):
    group = groups.setdefault(arm.group, {"bpb": {}, "bench": {}, "curves": [], "stages": []})
    results = _results(sweep_dir, arm)
    if results is None:
      missing.append(arm.name)
      continue
    bpb = {r["language"]: r["value"] for r in results.values() if r["family"] == "heldout"}
    others = [v for lang, v in bpb.items() if lang != "en"]
    if others:
      bpb[NON_ENGLISH] = statistics.fmean(others)
    for lang, value in bpb.items():
      group["bpb"].setdefault(lang, {})[arm.seed] = value
    for task, r in results.items():
      if r["family"] != "heldout":
        group["bench"].setdefault(task, {})[arm.seed] = r["value"]
    group["curves"].append(_curve(sweep_dir, arm))
    group["stages"] = group["stages"] or _stage_starts(sweep_dir, arm)
  return {"groups": groups, "missing": missing, "baseline": spec.baseline_group(sweep)}


def _languages(groups: dict[str, dict[str, Any]]) -> list[str]:
  seen: list[str] = []
  for g in groups.values():
    seen += [lang for lang in g["bpb"] if lang not in seen]
  ordered = [lang for lang in ("en", NON_ENGLISH) if lang in seen]
  return ordered + sorted(lang for lang in seen if lang not in ordered)


def _cell(by_seed: dict[int, float] | None) -> str:
  if not by_seed:
    return "-"
  mean, sd = _spread(list(by_seed.values()))
  return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def _deltas(by_seed: dict[int, float], base: dict[int, float]) -> list[float]:
  """The change on each seed both arms have: arms of a sweep share their seeds (the same
  initialisation and data order), so differences are compared seed by seed."""
  return [by_seed[s] - base[s] for s in sorted(set(by_seed) & set(base))]


def _change(by_seed: dict[int, float], base: dict[int, float]) -> tuple[str, bool | None]:
  """'+0.012' (the mean change over seeds) and whether it is within seed noise: |mean| <=
  NOISE_FACTOR x the standard deviation of the per-seed changes (None: one seed, no estimate)."""
  deltas = _deltas(by_seed, base)
  mean, sd = _spread(deltas)
  if sd is None:
    return f"{mean:+.3f}", None
  return f"{mean:+.3f}", abs(mean) <= NOISE_FACTOR * sd


def _table(groups: dict[str, dict[str, Any]], field: str, columns: list[str]) -> list[str]:
  """A row per arm group: the mean over seeds (± their spread) of each column's values."""
  return [
    "| arm | " + " | ".join(columns) + " |",
    "|---" * (len(columns) + 1) + "|",
    *(
      f"| {name} | " + " | ".join(_cell(g[field].get(c)) for c in columns) + " |"
      for name, g in groups.items()
    ),
  ]


def markdown(sweep: spec.Sweep, sweep_dir: str, data: dict[str, Any]) -> str:
  groups, baseline = data["groups"], data["baseline"]
  languages = _languages(groups)
  seeds = list(sweep.seeds)
  lines = [
    f"# Sweep {storage.name(sweep_dir)}",
    "",
    f"{len(groups)} arm(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); baseline: "
    f"`{baseline}`. Held-out text: `{sweep.heldout}`. Values are means over seeds"
    + (" ± their standard deviation." if len(seeds) > 1 else "."),
    "",
  ]
  if data["missing"]:
    lines += [f"Not evaluated yet: {', '.join(data['missing'])}.", ""]
  lines += ["## Held-out bits per byte (lower is better)", "", *_table(groups, "bpb", languages)]
  lines += ["", f"## Change against the baseline `{baseline}` (negative: better)", ""]
  base = groups.get(baseline, {}).get("bpb", {})
  if len(seeds) > 1:
    lines += [
      "Changes are compared seed by seed (the arms share their seeds: the same initialisation "
      f"and data order). `~`: within seed noise, |mean change| <= {NOISE_FACTOR:g} x the "
      "standard deviation of the per-seed changes; such a difference is not evidence either "
      "way. With few seeds this is a rough screen, not a significance test.",
      "",
    ]
  else:
    lines += [
      "One seed per arm: there is no estimate of seed noise, so no difference below can be told "
      "apart from it. Run the sweep with two or more seeds (`Sweep.seeds`) before reading them.",
      "",
    ]
  lines += ["| arm | " + " | ".join(languages) + " |", "|---" * (len(languages) + 1) + "|"]
  summary = []
  for name, g in groups.items():
    if name == baseline:
      continue
    cells = []
    for lang in languages:
      if not g["bpb"].get(lang) or not base.get(lang):
        cells.append("-")
        continue
      text, noise = _change(g["bpb"][lang], base[lang])
      cells.append(text + (" ~" if noise else ""))
      if lang in ("en", NON_ENGLISH):
        verdict = {None: "no noise estimate", True: "within seed noise", False: "beyond seed noise"}
        summary.append(f"- `{name}`, {lang}: {text} bits per byte ({verdict[noise]})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if summary:
    lines += ["", *summary]
  lines += [
    "",
    "## Charts",
    "",
    "- `change.png`: the change against the baseline per language and arm (error bars: the "
    "standard deviation of the per-seed changes)",
    "- `learning_curves.png`: held-out bits per byte during training per language, mean over "
    "seeds; dashed lines: curriculum stage starts",
  ]
  bench = sorted({t for g in groups.values() for t in g["bench"]})
  if bench:
    lines += ["", "## Benchmarks", "", *_table(groups, "bench", bench)]
  return "\n".join(lines) + "\n"


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
  """Steps every seed evaluated, and the mean of `key` there."""
  per_seed = [{r["step"]: r[key] for r in c if key in r} for c in curves if c]
  if not per_seed:
    return [], []
  steps = sorted(set.intersection(*(set(s) for s in per_seed)))
  return steps, [statistics.fmean(s[step] for s in per_seed) for step in steps]


def charts(data: dict[str, Any], out_dir: str) -> list[str]:
  import io

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = data["groups"]
  written = []
  # The change against the baseline per language, one bar per arm (error bars: seed spread).
  baseline = data["baseline"]
  base = groups.get(baseline, {}).get("bpb", {})
  others = [name for name in groups if name != baseline]
  columns = [x for x in _languages(groups) if base.get(x)]
  if others and columns:
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.7 * len(columns))), 3.6))
    width = 0.8 / len(others)
    for i, name in enumerate(others):
      bpb = groups[name]["bpb"]
      deltas, errors = [], []
      for lang in columns:
        if not bpb.get(lang):
          deltas.append(0.0)
          errors.append(0.0)
          continue
        mean, sd = _spread(_deltas(bpb[lang], base[lang]))
        deltas.append(mean)
        errors.append(sd or 0.0)
      xs = [x + i * width - 0.4 + width / 2 for x in range(len(columns))]
      ax.bar(xs, deltas, width, yerr=errors, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize="small")
    ax.set_ylabel(f"bits per byte - {baseline}", fontsize="small")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    written.append(_save(fig, plt, io, out_dir, "change.png"))
  # Learning curves per language.
  languages = sorted(
    {
      k.split("/", 1)[1]
      for g in groups.values()
      for c in g["curves"]
      for r in c
      for k in r
      if k.startswith("val_bpb/")
    }
  )
  if languages:
    panels = ["en"] * ("en" in languages) + [x for x in languages if x != "en"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    starts = sorted({start for g in groups.values() for start in g["stages"]})
    for ax, lang in zip(axes.flat, panels):
      for name, g in groups.items():
        steps, values = _mean_curve(g["curves"], f"val_bpb/{lang}")
        ax.plot(steps, values, label=name)
      for start in starts:
        ax.axvline(start, linestyle="--", color="grey", linewidth=0.8)
      ax.set_title(lang, fontsize="small")
      ax.tick_params(labelsize="x-small")
    for ax in list(axes.flat)[len(panels) :]:
      ax.axis("off")
    axes.flat[0].legend(fontsize="xx-small")
    fig.supxlabel("step", fontsize="small")
    fig.supylabel("held-out bits per byte", fontsize="small")
    fig.tight_layout()
    written.append(_save(fig, plt, io, out_dir, "learning_curves.png"))
  return written


def _save(fig, plt, io, out_dir: str, name: str) -> str:
  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  storage.write_bytes(storage.join(out_dir, name), png.getvalue())
  return name


def write(sweep: spec.Sweep, sweep_dir: str) -> str:
  """Writes <sweep dir>/report/ (report.md, change.png, learning_curves.png); returns the text."""
  data = collect(sweep, sweep_dir)
  out_dir = storage.join(sweep_dir, "report")
  storage.makedirs(out_dir)
  text = markdown(sweep, sweep_dir, data)
  storage.write_text(storage.join(out_dir, "report.md"), text)
  charts(data, out_dir)
  return text
