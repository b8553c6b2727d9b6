"""Test setup: 8 host CPU devices for the sharding tests (must be set before jax is imported)."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX's persistent compilation cache, for this process and the trainers the tests start as
# subprocesses: most tests compile the same few tiny-model steps, and a compiled step is read back
# instead of compiled again (about 16 s -> 2 s each on 2 cores). Kept between runs; entries are
# keyed by the program, the JAX version and the compile options, so a stale one is never used.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "polylm-jax",
    "test-compilation-cache",
  ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs (read at its import) asks Google's storage-control API whether a bucket is zonal; the GCS
# emulator the object-storage tests use has no such API (each ask would wait a minute and fail).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def synthetic_batch(seed: int, batch: int, length: int, vocab: int, segments=(20, 12)):
  """Packed rows of random tokens: every row holds documents of the given lengths, then padding."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  start = 0
  for i, n in enumerate(segments, start=1):
    seg[:, start : start + n] = i
    pos[:, start : start + n] = np.arange(n)
    start += n
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "weights": (seg > 0).astype(np.float32),
    "positions": pos,
    "segment_ids": seg,
  }


@pytest.fixture
def make_batch():
  return synthetic_batch


@pytest.fixture(autouse=True)
def _fresh_global_state():
  """Each test starts from the same global state whatever ran before it: the seqio registry as
  the package registers it (tasks tagged with the default language set), no dropped-record
  counts, no gin config."""
  yield
  import gin
  import seqio

  from polylm_jax.data import documents

  for registry, baseline in (
    (seqio.MixtureRegistry, _BASELINE["mixtures"]),
    (seqio.TaskRegistry, _BASELINE["tasks"]),
  ):
    for name in set(registry.names()) - baseline:
      registry.remove(name)
  for registry, objects in (  # a test replaced a sample task or mixture (another language set)
    (seqio.TaskRegistry, _BASELINE["task_objects"]),
    (seqio.MixtureRegistry, _BASELINE["mixture_objects"]),
  ):
    for name, provider in objects.items():
      if name not in registry.names() or registry.get(name) is not provider:
        if name in registry.names():
          registry.remove(name)
        registry.add_provider(name, provider)
  with documents._LOCK:
    documents._DROPPED.clear()
    documents._SEEN.clear()
  gin.clear_config()


def _baseline():
  import seqio

  from polylm_jax.data import tasks  # noqa: F401 (registers the sample tasks and mixture)

  return {
    "tasks": set(seqio.TaskRegistry.names()),
    "mixtures": set(seqio.MixtureRegistry.names()),
    "task_objects": {n: seqio.TaskRegistry.get(n) for n in seqio.TaskRegistry.names()},
    "mixture_objects": {n: seqio.MixtureRegistry.get(n) for n in seqio.MixtureRegistry.names()},
  }


_BASELINE = _baseline()


@pytest.fixture
def train_args():
  """runs.train_args: polylm-train arguments for a short quickstart run."""
  import runs

  return runs.train_args


@pytest.fixture
def tiny_step():
  """runs.tiny_step: a TrainStep of the tiny model, keyword arguments overriding the defaults."""
  import runs

  return runs.tiny_step


# The modules whose tests take minutes (docs/benchmarks.md, "The test suite"), longest first.
LONGEST_MODULES = (
  "test_readme",
  "test_checkpoint",
  "test_sweep",
  "test_elastic_data",
  "test_lm_eval",
  "test_compile",
  "test_multihost",
)


def pytest_collection_modifyitems(config, items):
  """LONGEST_MODULES first, then the modules with the most slow tests, each module's tests in
  their own order: with several test processes (tests/run.sh runs pytest-xdist, one module per
  process at a time) the longest modules start at once instead of ending the run alone."""
  slow: dict[str, int] = {}
  for item in items:
    slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(
      item.get_closest_marker("slow")
    )
  order = {name: i for i, name in enumerate(slow)}

  def key(item):
    name = item.module.__name__
    first = LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
    return (first, -slow[name], order[name])

  items.sort(key=key)


@pytest.fixture
def lm_eval_tasks(tmp_path):
  """tests/fixtures/lm_eval's task YAMLs with their data paths filled in, in tmp_path/tasks: an
  include path of local lm-eval tasks (no network)."""
  fixtures = pathlib.Path(__file__).resolve().parent / "fixtures" / "lm_eval"
  out = tmp_path / "tasks"
  out.mkdir()
  for yaml in fixtures.glob("*.yaml"):
    (out / yaml.name).write_text(yaml.read_text().replace("{FIXTURES}", str(fixtures)))
  return out
