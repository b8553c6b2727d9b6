"""PolyLM's multilingual benchmark suite, as lm-evaluation-harness names its tasks.

The paper reports XNLI, XCOPA, PAWS-X, XWinograd, XStoryCloze (understanding), TyDiQA (QA), MTG and
WMT20 (generation). lm-eval has the first six; WMT20 and FLORES-200 translation are tasks this
package ships (eval/translation.py); Belebele, MGSM, MLQA and Global-MMLU (lm-eval's) are today's
multilingual set (lm-eval's XQuAD tasks import a module transformers 5 no longer has).
`FAMILIES` maps each family to its task per language code (per direction, `src-tgt`, for
translation); a run keeps the languages the model was trained on (a direction: both of its
languages). `SETS` names several families at once.

`run_suite` loads every task first (so missing data fails before any compute, naming the task and
where it looked), prints a time estimate, then evaluates task by task, writing each task's result
to <out>/tasks/<task>.json as it finishes: an interrupted run, started again, reuses them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any

from polylm_jax.errors import DataError, MissingDataError
from polylm_jax.eval import translation
from polylm_jax.io import storage

# family -> {language code (or direction src-tgt): lm-eval task or group}
FAMILIES: dict[str, dict[str, str]] = {
  "xnli": {
    code: f"xnli_{code}" for code in ("ar", "de", "en", "es", "fr", "ru", "th", "tr", "vi", "zh")
  },
  "xcopa": {code: f"xcopa_{code}" for code in ("id", "it", "th", "tr", "vi", "zh")},
  "pawsx": {code: f"paws_{code}" for code in ("de", "en", "es", "fr", "ja", "ko", "zh")},
  "xwinograd": {
    "en": "xwinograd_en",
    "fr": "xwinograd_fr",
    "ja": "xwinograd_jp",
    "pt": "xwinograd_pt",
    "ru": "xwinograd_ru",
    "zh": "xwinograd_zh",
  },
  "xstorycloze": {code: f"xstorycloze_{code}" for code in ("ar", "en", "es", "id", "ru", "zh")},
  "tydiqa": {code: f"tydiqa_goldp_{code}" for code in ("ar", "en", "id", "ko", "ru")},
  **translation.families(),
  # Belebele's passages are FLORES-200's, its tasks named by FLORES codes (all of the table's).
  "belebele": {code: f"belebele_{flores}" for code, flores in translation.FLORES_CODES.items()},
  "mgsm": {
    code: f"mgsm_direct_{code}"
    for code in ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
  },
  "mlqa": {code: f"mlqa_{code}_{code}" for code in ("ar", "de", "en", "es", "hi", "vi", "zh")},
  "global_mmlu": {  # lm-eval groups: the mean over their six subjects, weighted by size
    code: f"global_mmlu_{code}"
    for code in ("ar", "bn", "de", "en", "es", "fr", "hi", "id", "it", "ja", "ko", "pt", "sw", "zh")
  },
}
# The headline metric per family (lm-eval key; `metric,filter` picks a filter); the others: acc.
METRIC = {
  "tydiqa": "f1",
  **translation.HEADLINE,
  "mgsm": "exact_match,flexible-extract",
  "mlqa": "f1",
}
# Names for several families at once.
SETS: dict[str, list[str]] = {
  "translation": ["wmt20", "flores"],
  "paper": ["xnli", "xcopa", "pawsx", "xwinograd", "xstorycloze", "tydiqa", "wmt20"],
  "modern": ["belebele", "mgsm", "mlqa", "global_mmlu", "flores"],
}
# Families run when --tasks is not given: the understanding and QA benchmarks.
DEFAULT = ["xnli", "xcopa", "pawsx", "xwinograd", "xstorycloze", "tydiqa"]


@dataclasses.dataclass(frozen=True)
class Spec:
  task: str  # the lm-eval task name
  family: str
  language: str  # a language code, or "-" when the task has none
  # The headline metric (lm-eval key without the filter, e.g. "acc"); "" for a task outside the
  # suite's families: the first metric the task reports (its YAML's metric_list order).
  metric: str


def _split_name(task: str, languages) -> tuple[str, str]:
  """'polylm_test_mc_th' -> ('polylm_test_mc', 'th') when 'th' is a known language code."""
  for family, per_language in FAMILIES.items():
    for language, name in per_language.items():
      if name == task:
        return family, language
  head, _, tail = task.rpartition("_")
  return (head, tail) if head and tail in languages else (task, "-")


def shipped_only(names) -> bool:
  """Whether the names (families, sets, tasks) are all translation tasks this package ships,
  whose data comes from their own sources rather than the Hugging Face Hub."""
  families = [family for name in names for family in SETS.get(name, [name])]
  return all(f in translation.families() or translation.is_shipped(f) for f in families)


def resolve(names, languages, known_tasks) -> list[Spec]:
  """Task specs for family names (expanded to the model's languages) and task names."""
  out: list[Spec] = []
  names = [family for name in names for family in SETS.get(name, [name])]
  for name in names:
    if name in FAMILIES:
      kept = {
        code: t
        for code, t in FAMILIES[name].items()
        if all(part in languages for part in code.split("-"))
      }
      if not kept:
        logging.warning(
          "suite: %s has no language this model was trained on (%s); skipped",
          name,
          ", ".join(sorted(FAMILIES[name])),
        )
      out += [Spec(t, name, code, METRIC.get(name, "acc")) for code, t in sorted(kept.items())]
      continue
    if name not in known_tasks:
      close = difflib.get_close_matches(name, [*SETS, *FAMILIES, *known_tasks], n=5)
      raise ValueError(
        f"unknown task {name!r}"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + f" (families: {', '.join(FAMILIES)}; sets: {', '.join(SETS)}; any lm-eval task "
        f"name works, and --include_path adds your own)"
      )
    family, language = _split_name(name, languages)
    out.append(Spec(name, family, language, METRIC.get(family, "")))
  return out


# Task YAMLs shipped in the package (always indexed, before a user's --include_path).
TASK_DIRS = [translation.TASK_DIR]


def task_manager(include_path: str | None = None):
  """lm-eval's TaskManager over its own tasks, the shipped ones and `include_path`'s (later
  directories override earlier ones, as lm-eval's own include paths do).

  Indexing lm-eval's ~14,000 task YAMLs takes about 12 s; that index is built once per process
  (the installed package's files do not change while it runs) and the shipped and included
  directories are indexed afresh at every call, so a task added or edited there is seen."""
  from lm_eval.tasks import TaskManager
  from lm_eval.tasks._index import Kind

  paths = [str(d) for d in TASK_DIRS] + ([include_path] if include_path else [])
  manager = TaskManager(include_path=paths, include_defaults=False)
  # TaskIndex.build indexes each directory on its own, then lets later ones override: the
  # defaults' index first, then these, is the index TaskManager(include_path=paths) builds.
  # (TaskManager keeps it in `_index` and its name lists in `_all_*`; tests/test_lm_eval.py
  # checks the result against TaskManager's own, so an lm-eval that changes this shows there.)
  index = {**_default_index(), **manager._index}
  manager._index = index
  kinds: dict[Any, list[str]] = {}
  for name, entry in index.items():
    kinds.setdefault(entry.kind, []).append(name)
  manager._all_tasks = sorted(index)
  manager._all_subtasks = sorted([*kinds.get(Kind.TASK, []), *kinds.get(Kind.PY_TASK, [])])
  manager._all_groups = sorted(kinds.get(Kind.GROUP, []))
  manager._all_tags = sorted(kinds.get(Kind.TAG, []))
  return manager


@functools.cache
def _default_index() -> dict[str, Any]:
  """lm-eval's index of its own task directory, built at the first call in this process."""
  import lm_eval.tasks
  from lm_eval.tasks._index import TaskIndex

  return TaskIndex.build([pathlib.Path(lm_eval.tasks.__file__).parent])


def datasets_cache() -> str:
  return os.environ.get("HF_DATASETS_CACHE") or str(translation.data_root() / "datasets")


def load_tasks(specs, task_manager, *, fetching: bool = False) -> dict[str, Any]:
  """lm-eval Task (or Group) objects, their data loaded now, so a missing dataset fails before any
  compute. `fetching`: loading is the download itself (polylm-eval fetch, with network)."""
  out = {}
  for i, spec in enumerate(specs):
    try:
      loaded = task_manager.load([spec.task])
      out[spec.task] = loaded["tasks"].get(spec.task) or loaded["groups"][spec.task]
    except DataError:  # a shipped task's reader: it names the task and the file
      raise
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
      if fetching:
        left = [s.task for s in specs[i:]]
        raise MissingDataError(
          f"task {spec.task}: its data could not be downloaded ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:200]}); this needs network access to the Hugging Face "
          f"Hub. Fetched: {len(out)} of {len(specs)} task(s); not fetched: {', '.join(left)}"
        ) from e
      raise MissingDataError(
        f"task {spec.task}: its data could not be loaded offline ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]}); looked in the datasets cache {datasets_cache()}. "
        f"Fill it on a machine with network (polylm-eval fetch --tasks {spec.task} "
        f"--data_dir DIR, then copy DIR here and pass --data_dir DIR); see docs/evaluation.md"
      ) from e
  return out


def leaves(task) -> list:
  """The lm-eval tasks a Task or Group evaluates."""
  return task.get_all_tasks() if hasattr(task, "get_all_tasks") else [task]


def count_requests(task, limit: int | None) -> int:
  total = 0
  for leaf in leaves(task):
    docs = list(leaf.eval_docs)
    if limit is not None:
      docs = docs[: int(limit)]
    if docs:
      per_doc = len(leaf.doc_to_choice(docs[0])) if leaf.OUTPUT_TYPE == "multiple_choice" else 1
      total += per_doc * len(docs)
  return total


def task_record(out_dir: str | pathlib.Path, task: str) -> str:
  """Where a finished task's result is kept (<out>/tasks/<task>.json): a re-run reuses it."""
  return storage.join(out_dir, "tasks", f"{task}.json")


def run_suite(
  lm,
  specs,
  tasks: dict[str, Any],
  out_dir: str | pathlib.Path,
  *,
  num_fewshot: int | None = None,
  limit: int | None = None,
  requests_per_second: float | None = None,
  task_manager=None,
  chat: bool = False,
) -> dict[str, dict]:
  """Evaluates task by task (skipping those already in <out>/tasks/); returns {task: record}.
  `chat`: requests in the model's instruction format (lm-eval's apply_chat_template), few-shot
  examples as earlier turns."""
  from lm_eval import evaluator

  task_dir = storage.join(out_dir, "tasks")
  storage.makedirs(task_dir)
  done = {s.task for s in specs if storage.exists(task_record(out_dir, s.task))}
  todo = [s for s in specs if s.task not in done]
  counts = {s.task: count_requests(tasks[s.task], limit) for s in todo}
  total = sum(counts.values())
  if done:
    logging.info(
      "suite: reusing %d finished task(s) in %s: %s",
      len(done),
      task_dir,
      ", ".join(sorted(done)),
    )
  estimate = (
    f", about {total / requests_per_second / 60:.1f} min at the measured "
    f"{requests_per_second:.1f} requests/s"
    if requests_per_second
    else ""
  )
  logging.info("suite: %d task(s) to run, %d requests%s", len(todo), total, estimate)
  for spec in todo:
    set_num_fewshot(tasks[spec.task], num_fewshot)
    began = time.perf_counter()
    # task_manager: without one, simple_evaluate re-indexes lm-eval's task YAMLs (~12 s) per call.
    result = evaluator.simple_evaluate(
      model=lm,
      tasks=[tasks[spec.task]],
      num_fewshot=None,  # set on the task above
      limit=limit,
      bootstrap_iters=0,
      log_samples=False,
      task_manager=task_manager,
      apply_chat_template=chat,
      fewshot_as_multiturn=chat,
    )
    metrics = result["results"][spec.task]
    metric, key = headline(spec, metrics)
    record = dict(
      dataclasses.asdict(spec),
      metric=metric,
      value=float(metrics[key]),
      metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
      num_fewshot=num_fewshot or 0,
      limit=limit,
      seconds=time.perf_counter() - began,
      requests=counts[spec.task],
    )
    storage.write_text(task_record(out_dir, spec.task), json.dumps(record, indent=2))
    logging.info(
      "suite: %s %s = %.4f (%.0f s)", spec.task, metric, record["value"], record["seconds"]
    )
  return {s.task: json.loads(storage.read_text(task_record(out_dir, s.task))) for s in specs}


def set_num_fewshot(task, num_fewshot: int | None) -> None:
  """lm-eval's rule for an asked number of shots (a task whose YAML says 0 keeps 0), applied
  to the task before evaluating: lm-eval then has nothing to override and no warning to give."""
  for leaf in leaves(task):
    if num_fewshot is not None and leaf.get_config("num_fewshot") != 0:
      leaf.set_config(key="num_fewshot", value=num_fewshot)


_NOT_METRICS = ("alias", "name", "sample_len", "samples")


def headline(spec: Spec, metrics: dict[str, Any]) -> tuple[str, str]:
  """(metric, lm-eval result key) of a task's headline number; for a task outside the suite's
  families the first metric it reports (logged)."""
  if spec.metric:
    # "metric" matches the first filter reporting it; "metric,filter" that filter's.
    key = next(
      (k for k in metrics if k == spec.metric or k.split(",")[0] == spec.metric),
      None,
    )
    if key is None:
      raise ValueError(
        f"task {spec.task} reported no {spec.metric!r} metric (it has {sorted(metrics)})"
      )
    return spec.metric.split(",")[0], key
  reported = [
    k
    for k in metrics
    if k.split(",")[0] not in _NOT_METRICS
    and not k.split(",")[0].endswith("_stderr")
    and isinstance(metrics[k], (int, float))
  ]
  if not reported:
    raise ValueError(f"task {spec.task} reported no metric (it has {sorted(metrics)})")
  metric = reported[0].split(",")[0]
  logging.info("suite: %s reports %s first: its headline metric", spec.task, metric)
  return metric, reported[0]
