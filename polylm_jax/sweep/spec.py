"""What a sweep is: base gin files, bindings every arm shares, a grid of gin bindings whose cross
product gives the arms, and seeds (each arm trained once per seed). Written as a gin file of
`Sweep.*` bindings (gin_configs/sweeps/); see docs/experiments.md.

An arm's name comes from its grid values (`rates=en0.25__seed=1`), so it is the same on every
start; its workdir is `<sweep dir>/arms/<name>`. A sweep directory records its sweep
(`sweep.json`) at the first start and refuses another.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
from typing import Any, Mapping, Sequence

from polylm_jax.errors import ConfigError

# Set per seed by the sweep (the model's initialisation and the data order), never in the grid.
SEED_BINDINGS = ("TrainerConfig.seed", "DataConfig.seed")
# Set by vocabulary arms (Sweep.vocab_sizes).
VOCAB_BINDINGS = ("train.tokenizer", "model_config.vocab_size")
VOCAB = "vocab_size"  # the baseline's key for a vocabulary arm's size


@dataclasses.dataclass(frozen=True)
class Sweep:
  gin_files: Sequence[str] = ()  # the base config of every arm (as polylm-train's --gin_file)
  grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)  # binding -> values
  # Every arm's bindings, after the base files ('TrainerConfig.num_steps = 300').
  bindings: Sequence[str] = ()
  seeds: Sequence[int] = (0,)  # each grid point trained once per seed
  # The grid values of the arm the report compares against (None: the first grid point).
  baseline: Mapping[str, Any] | None = None
  eval_tasks: Sequence[str] = ()  # polylm-eval tasks after training, besides `heldout`
  heldout: str = "sample"  # the heldout family's text (polylm-eval --heldout)
  # Vocabulary arms: a tokenizer per size, trained once by `polylm-tokenizer train` with
  # `tokenizer_flags` (its input), crossed with the grid; each arm trains with its tokenizer
  # (train.tokenizer) and a model vocabulary of that size (model_config.vocab_size).
  vocab_sizes: Sequence[int] = ()
  tokenizer_flags: Sequence[str] = ("--sample",)
  tokenizer_command: str = "train"  # or 'balance' (weights chosen on a parallel dev set)

  def __post_init__(self):
    for name in ("gin_files", "bindings", "seeds", "eval_tasks", "vocab_sizes", "tokenizer_flags"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "grid", {k: list(v) for k, v in dict(self.grid).items()})
    if self.baseline is not None:
      object.__setattr__(self, "baseline", dict(self.baseline))

  def to_json(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str  # e.g. 'rates=en0.25__seed=1': the arm's workdir and label
  group: str  # the name without the seed: arms that differ only in seed
  values: dict[str, Any]  # grid binding -> value
  seed: int
  bindings: tuple[str, ...]  # the sweep's common bindings, then the arm's own
  vocab_size: int | None = None  # a vocabulary arm's tokenizer size (runner.py adds its bindings)


def _lhs(binding: str) -> str:
  return binding.split("=", 1)[0].strip()


def _slug(value: Any) -> str:
  text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
  return re.sub(r"[^A-Za-z0-9._+-]+", "", text) or "x"


def _short_names(keys: Sequence[str]) -> dict[str, str]:
  """'final/Stage.rates' -> 'rates', unless two keys end alike (then the whole key, '/' as '-')."""
  last = {k: re.split(r"[./]", k)[-1] for k in keys}
  return {
    k: last[k] if list(last.values()).count(last[k]) == 1 else k.replace("/", "-") for k in keys
  }


def check(sweep: Sweep) -> None:
  """What can be wrong with a sweep before any gin file is read; each error names the field."""
  if not sweep.gin_files:
    raise ConfigError("Sweep.gin_files is empty: name the base config of every arm")
  if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
    raise ConfigError(f"Sweep.seeds = {list(sweep.seeds)}: give one or more distinct seeds")
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in sweep.seeds):
    raise ConfigError(f"Sweep.seeds = {list(sweep.seeds)}: seeds are integers")
  common = {_lhs(b) for b in sweep.bindings}
  for key, values in sweep.grid.items():
    if key in SEED_BINDINGS:
      raise ConfigError(f"Sweep.grid[{key!r}]: seeds are Sweep.seeds (they set {SEED_BINDINGS})")
    if key in common:
      raise ConfigError(f"Sweep.grid[{key!r}] is also set by Sweep.bindings; set it in one place")
    if not values:
      raise ConfigError(f"Sweep.grid[{key!r}] has no values")
    slugs = [_slug(v) for v in values]
    if len(set(slugs)) != len(slugs):
      raise ConfigError(f"Sweep.grid[{key!r}] = {values}: values repeat (or name arms alike)")
  for key in common & set(SEED_BINDINGS):
    raise ConfigError(f"Sweep.bindings sets {key}; seeds are Sweep.seeds")
  sizes = list(sweep.vocab_sizes)
  if sweep.tokenizer_command not in ("train", "balance"):
    raise ConfigError(
      f"Sweep.tokenizer_command = {sweep.tokenizer_command!r}: 'train' or 'balance' "
      f"(polylm-tokenizer's commands)"
    )
  if sizes:
    if len(set(sizes)) != len(sizes) or not all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes
    ):
      raise ConfigError(f"Sweep.vocab_sizes = {sizes}: give distinct positive sizes")
    for key in (common | set(sweep.grid)) & set(VOCAB_BINDINGS):
      raise ConfigError(f"{key} is set per vocabulary arm (Sweep.vocab_sizes); do not bind it")
  axes = dict(sweep.grid, **({VOCAB: sizes} if sizes else {}))
  if sweep.baseline is not None:
    unknown = set(sweep.baseline) - set(axes)
    if unknown:
      raise ConfigError(
        f"Sweep.baseline names {sorted(unknown)}, which are not grid bindings {sorted(axes)}"
      )
    for key, value in sweep.baseline.items():
      if _slug(value) not in {_slug(v) for v in axes[key]}:
        raise ConfigError(
          f"Sweep.baseline[{key!r}] = {value!r} is not one of the grid's values {axes[key]}"
        )
    if set(sweep.baseline) != set(axes):
      raise ConfigError(
        f"Sweep.baseline gives {sorted(sweep.baseline)}; give a value for every grid binding "
        f"{sorted(axes)}"
      )


def arms(sweep: Sweep) -> list[Arm]:
  """Every grid point x seed, grid points in the order of the grid's values, seeds innermost."""
  check(sweep)
  keys = list(sweep.grid)
  short = _short_names(keys)
  out = []
  sizes: list[int | None] = list(sweep.vocab_sizes) or [None]
  for size in sizes:
    for point in itertools.product(*(sweep.grid[k] for k in keys)):
      values = dict(zip(keys, point))
      parts = [f"vocab={size}"] if size is not None else []
      parts += [f"{short[k]}={_slug(v)}" for k, v in values.items()]
      group = "__".join(parts) or "base"
      for seed in sweep.seeds:
        own = tuple(f"{k} = {v!r}" for k, v in values.items())
        seeds = tuple(f"{k} = {seed}" for k in SEED_BINDINGS)
        bindings = tuple(sweep.bindings) + own + seeds
        out.append(Arm(f"{group}__seed={seed}", group, values, seed, bindings, size))
  return out


def baseline_group(sweep: Sweep) -> str:
  all_arms = arms(sweep)
  if sweep.baseline is None:
    return all_arms[0].group
  wanted = {k: _slug(v) for k, v in sweep.baseline.items()}

  def axes(arm: Arm) -> dict[str, str]:
    return {k: _slug(v) for k, v in arm.values.items()} | (
      {VOCAB: _slug(arm.vocab_size)} if arm.vocab_size is not None else {}
    )

  return next(a.group for a in all_arms if axes(a) == wanted)


def find_gin_file(path: str) -> str:
  """A sweep file as given, or under the package's gin_configs (like --gin_file)."""
  from polylm_jax.train.gin_setup import GIN_DIR

  for candidate in (pathlib.Path(path), GIN_DIR / path):
    if candidate.is_file():
      return str(candidate)
  raise ConfigError(f"--sweep={path}: no such file (looked in the current directory and {GIN_DIR})")


def load(path: str, bindings: Sequence[str] = ()) -> Sweep:
  """The Sweep a gin file of `Sweep.*` bindings (and `--sweep_bindings`) describes."""
  import gin

  from polylm_jax.train.gin_setup import GIN_DIR

  found = find_gin_file(path)
  gin.clear_config()
  if "Sweep" not in _registered():
    gin.external_configurable(Sweep, "Sweep")
  gin.add_config_file_search_path(str(GIN_DIR))
  try:
    gin.parse_config_files_and_bindings([found], list(bindings))
    sweep = gin.get_configurable("Sweep")()
  except (ValueError, KeyError, TypeError, SyntaxError) as e:
    raise ConfigError(f"--sweep={path}: {e}") from e
  finally:
    gin.clear_config()
  check(sweep)
  return sweep


def _registered() -> set[str]:
  from gin import config as gin_config

  return {selector.split(".")[-1] for selector, _ in gin_config._REGISTRY.items()}


def differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """'field: saved X, given Y' for each Sweep field that differs."""
  return [
    f"{k}: this directory's {saved.get(k)!r}, given {given.get(k)!r}"
    for k in sorted(set(saved) | set(given))
    if saved.get(k) != given.get(k)
  ]
