"""Staged language curricula: which tasks (languages) feed which steps, at what rates.

A curriculum is configuration (gin), not code: an ordered list of `Stage`s, each starting at a step
and giving mixture rates. PolyLM's default (gin_configs/data/polylm_curriculum.gin): a first stage
with about 30% non-English, a final stage with 60% non-English (and the high-quality tasks you add).

Rates per stage: explicit `rates` ({language or task: rate}); with `temperature` set, the share the
explicit rates leave is spread over the remaining tasks by temperature sampling, p ~ n^alpha
(mT5 / XLM-R; alpha < 1 boosts low-resource languages), n from `counts` or else each task's number
of training examples. Each stage becomes a seqio Mixture; the resolved table is logged at start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import seqio

from polylm_jax import languages
from polylm_jax.data import tasks as task_registry
from polylm_jax.typecheck import check_fields


@dataclasses.dataclass(frozen=True)
class Stage:
  start_step: int = 0
  rates: dict[str, float] | None = None
  temperature: float | None = None  # alpha in p ~ n^alpha for the tasks without explicit rates
  counts: dict[str, float] | None = None  # n per language/task (tokens); default: example counts
  tasks: tuple[str, ...] | None = None  # temperature-sampling pool (default: the run's languages)
  name: str = ""

  def __post_init__(self):
    check_fields(self)


def task_name(key: str) -> str:
  """A language code ('th') or a registered task / mixture name."""
  if key in seqio.TaskRegistry.names() or key in seqio.MixtureRegistry.names():
    return key
  name = task_registry.TASK_PREFIX + key
  if name not in seqio.TaskRegistry.names():
    raise ValueError(
      f"curriculum: {key!r} is neither a registered task nor a language with a task {name!r}"
    )
  return name


def _example_count(name: str, split: str) -> float:
  task = seqio.get_mixture_or_task(name)
  n = task.num_input_examples(split) if hasattr(task, "num_input_examples") else None
  if not n:
    raise ValueError(
      f"curriculum: no example count for {name!r}; give Stage.counts for temperature sampling"
    )
  return float(n)


def resolve_rates(
  stage: Stage, split: str = "train", language_set: languages.Languages = languages.DEFAULT
) -> dict[str, float]:
  """{task name: normalised rate} for one stage; bad rates fail naming the stage and key. A
  temperature stage without `tasks` samples over `language_set` (the run's languages)."""
  label = f"stage {stage.name or stage.start_step}"
  explicit = {task_name(k): float(v) for k, v in (stage.rates or {}).items()}
  for k, v in explicit.items():
    if v < 0:
      raise ValueError(f"curriculum {label}: rate of {k!r} is negative ({v})")
  rates = dict(explicit)
  if stage.temperature is not None:
    pool = [task_name(k) for k in (stage.tasks or language_set.codes)]
    rest = [t for t in pool if t not in explicit]
    share = 1.0 - sum(explicit.values())
    if share < 0:
      raise ValueError(
        f"curriculum {label}: explicit rates sum to {sum(explicit.values())} > 1, "
        f"leaving nothing for temperature sampling"
      )
    counts = {task_name(k): float(v) for k, v in (stage.counts or {}).items()}
    n = {t: counts.get(t) or _example_count(t, split) for t in rest}
    weights = {t: n[t] ** stage.temperature for t in rest}
    total = sum(weights.values())
    for t in rest:
      rates[t] = share * weights[t] / total if total else 0.0
  total = sum(rates.values())
  if not rates or total <= 0:
    raise ValueError(f"curriculum {label}: all rates are zero")
  return {k: v / total for k, v in rates.items() if v > 0}


@dataclasses.dataclass(frozen=True)
class Curriculum:
  stages: tuple[Stage, ...] = (Stage(),)
  # The next stage's input pipeline is built in the background this many steps before its
  # boundary, so the switch does not stall the run (0: built at the boundary, in the way).
  prepare_ahead_steps: int = 100
  # The run's languages: the pool of a temperature stage without `tasks`, and the names in its
  # table. The training command sets it from `train.languages`.
  language_set: languages.Languages = languages.DEFAULT

  def __post_init__(self):
    stages = tuple(self.stages)
    object.__setattr__(self, "stages", stages)
    check_fields(self)
    if not stages:
      raise ValueError("Curriculum.stages is empty")
    starts = [s.start_step for s in stages]
    if self.prepare_ahead_steps < 0:
      raise ValueError(f"Curriculum.prepare_ahead_steps={self.prepare_ahead_steps} must be >= 0")
    if starts[0] != 0 or sorted(set(starts)) != starts:
      raise ValueError(
        f"Curriculum.stages must start at step 0 and have increasing start steps; got {starts}"
      )

  def stage_at(self, batch_index: int) -> int:
    """The stage that feeds the batch of step batch_index + 1."""
    return max(i for i, s in enumerate(self.stages) if s.start_step <= batch_index)

  def mixtures(self, split: str = "train") -> list[str]:
    """Registers and returns one seqio Mixture per stage. A Mixture holds the Task objects it
    was made with, so it is made again each time: its tasks may since have been registered
    again (for another language set)."""
    names = []
    for stage in self.stages:
      rates = resolve_rates(stage, split, self.language_set)
      key = hashlib.sha1(json.dumps(sorted(rates.items())).encode()).hexdigest()[:10]
      name = f"polylm_curriculum_{key}"
      if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
      seqio.MixtureRegistry.add(name, list(rates.items()))
      names.append(name)
    return names

  def table(self, split: str = "train") -> str:
    rows = []
    for i, stage in enumerate(self.stages):
      rates = resolve_rates(stage, split, self.language_set)
      english = sum(v for k, v in rates.items() if k.endswith("_en") or k == "en")
      shown = ", ".join(
        f"{task_registry.task_language(k, self.language_set)} {v:.1%}"
        for k, v in sorted(rates.items(), key=lambda kv: -kv[1])
      )
      rows.append(
        f"stage {i} {stage.name!r} from step {stage.start_step}: non-English "
        f"{1 - english:.1%} | {shown}"
      )
    return "\n".join(rows)
