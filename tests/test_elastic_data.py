"""Elastic data: the global batches depend on (seed, DataConfig.streams, step) only, so a run
saved on some number of processes resumes exactly on another (data/resumable.py). Processes are
simulated by one BatchIterator per process index, then real local processes (the last test)."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from runs import SHORT_BINDINGS

from polylm_jax.data import pipeline, resumable, tasks  # noqa: F401 (registers the sample tasks)

CFG = pipeline.DataConfig(mixture="polylm_pt_de", seq_len=64, batch_size=8, streams=4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _processes(m: int, config=CFG):
  return [resumable.BatchIterator(config, process_index=p, process_count=m) for p in range(m)]


def _global(processes) -> bytes:
  """The next global batch, as the trainer assembles it (process p's rows at block p)."""
  parts = [next(it) for it in processes]
  return b"".join(
    np.concatenate([part[key] for part in parts]).tobytes()
    for key in ("inputs", "segment_ids", "weights")
  )


def _saved_after(steps: int, m: int, config, directory) -> list[bytes]:
  """The run's first steps + 3 global batches (a reference run on m processes), and the data
  state of another m-process run saved after `steps` of them in `directory`."""
  reference = _processes(m, config)
  expected = [_global(reference) for _ in range(steps + 3)]
  first = _processes(m, config)
  for _ in range(steps):
    _global(first)
  for it in first:
    it.save(str(directory))
  return expected


def _restored(m: int, config, directory, position: int):
  resumed = _processes(m, config)
  for it in resumed:
    it.restore(str(directory), position)
  return resumed


def test_global_batches_do_not_depend_on_the_number_of_processes():
  one = _processes(1)
  expected = [_global(one) for _ in range(3)]
  for m in (2, 4):
    procs = _processes(m)
    assert [_global(procs) for _ in range(3)] == expected, m
  assert len(set(expected)) == 3  # the batches do move on


def test_a_run_saved_on_two_processes_resumes_on_one_and_on_four(tmp_path):
  expected = _saved_after(2, 2, CFG, tmp_path)  # streams=4: the same batches on 1 process
  assert resumable.saved_streams(str(tmp_path)) == 4
  for m in (1, 4):
    resumed = _restored(m, CFG, tmp_path, 2)
    assert [_global(resumed) for _ in range(3)] == expected[2:], m


def test_streams_0_take_the_first_process_count_and_keep_it(tmp_path):
  auto = dataclasses.replace(CFG, streams=0)
  expected = _saved_after(1, 2, auto, tmp_path)
  one = _restored(1, auto, tmp_path, 1)  # streams=0 would mean 1 stream here; the saved 2 stay
  assert one[0].streams == 2
  assert [_global(one) for _ in range(3)] == expected[1:]
  three = _processes(3, auto)
  with pytest.raises(ValueError, match="3 processes cannot split evenly; resume on a number"):
    three[0].restore(str(tmp_path), 1)
  explicit = _processes(1, dataclasses.replace(CFG, streams=4))
  with pytest.raises(ValueError, match=r"DataConfig.streams=4, but this run's data was drawn"):
    explicit[0].restore(str(tmp_path), 1)


def test_data_states_written_with_one_iterator_per_process_still_restore(tmp_path):
  config = dataclasses.replace(CFG, streams=0)
  expected = _saved_after(1, 2, config, tmp_path)
  # The layout of earlier versions: process_<i>.* and no streams.json.
  os.remove(tmp_path / "streams.json")
  for name in os.listdir(tmp_path):
    if name.startswith("stream_"):
      os.rename(tmp_path / name, tmp_path / name.replace("stream_", "process_"))
  resumed = _restored(2, config, tmp_path, 1)
  assert [_global(resumed) for _ in range(3)] == expected[1:]


def test_a_batch_the_streams_cannot_split_is_refused():
  with pytest.raises(ValueError, match=r"batch_size=8 is not divisible by the 3 row streams"):
    next(resumable.BatchIterator(dataclasses.replace(CFG, streams=3)))
  with pytest.raises(ValueError, match="streams=4 row streams cannot be split evenly over 3"):
    next(resumable.BatchIterator(CFG, process_index=0, process_count=3))


SHORT = [
  "TrainerConfig.num_steps = 6",
  # the same schedule whichever num_steps a leg stops at
  *SHORT_BINDINGS,
  "DataConfig.streams = 4",
  "TrainerConfig.eval_every = 0",
  "TrainerConfig.tensorboard = False",
  "CheckpointConfig.every_steps = 2",
  "final/Stage.start_step = 3",  # the curriculum switches stage inside the run
  # English and two more languages per stage: fewer pipelines for every process to start.
  "stage1/Stage.tasks = ('de', 'th')",
  "final/Stage.tasks = ('de', 'th')",
]


def _run_processes(workdir, processes: int, devices: int, num_steps: int, *extra: str) -> str:
  """`processes` local trainer processes of `devices` CPU devices each, one run."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
  )
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "polylm_jax.train",
        "--distributed",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={i}",
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={workdir}",
        *[f"--gin_bindings={b}" for b in SHORT],
        f"--gin_bindings=TrainerConfig.num_steps = {num_steps}",
        *[f"--gin_bindings={b}" for b in extra],
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  outs = [p.communicate(timeout=1800)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * processes, "\n".join(o[-3000:] for o in outs)
  return outs[0]


def _fingerprints(workdir) -> list[tuple[int, int]]:
  import json

  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["batch_fingerprint"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_a_run_moves_from_2x4_to_1x8_to_4x2_processes_with_the_same_batches(tmp_path):
  """Multi-host as on a pod, with local processes (gloo collectives): steps 1-2 on 2 processes of
  4 devices, 3-4 on 1 of 8 (this one), 5-6 on 4 of 2, through a curriculum's stage switch; every
  global batch equals that of an uninterrupted run on one process."""
  from polylm_jax.train import train_cli as cli

  reference = tmp_path / "reference"
  cli.main(
    ["--gin_file=gin_configs/quickstart.gin", f"--workdir={reference}"]
    + [f"--gin_bindings={b}" for b in SHORT]
  )
  elastic = tmp_path / "elastic"
  # With held-out evaluation: the processes' validation shards differ in length, and every
  # process must still run the same number of evaluation steps.
  out = _run_processes(elastic, 2, 4, 2, "TrainerConfig.eval_every = 2")
  assert "'data': 8" in out  # one mesh over both processes' devices
  assert "val_loss/en" in (elastic / "eval_metrics.jsonl").read_text()
  cli.main(
    ["--gin_file=gin_configs/quickstart.gin", f"--workdir={elastic}"]
    + [f"--gin_bindings={b}" for b in SHORT + ["TrainerConfig.num_steps = 4"]]
  )
  _run_processes(elastic, processes=4, devices=2, num_steps=6)
  expected = _fingerprints(reference)
  assert [step for step, _ in expected] == [1, 2, 3, 4, 5, 6]
  assert len({fingerprint for _, fingerprint in expected}) == 6
  # Process 0 alone writes the metrics: every step once, in order, with the reference's batch.
  assert _fingerprints(elastic) == expected


def test_batch_fingerprint_sees_every_row_in_place_but_not_the_sharding(make_batch):
  import jax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from polylm_jax.trainer.step import batch_fingerprint

  batch = make_batch(0, 8, 64, 100)
  fingerprint = int(jax.jit(batch_fingerprint)(batch))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "seq"))
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data", "seq"))) for k, v in batch.items()}
  assert int(jax.jit(batch_fingerprint)(sharded)) == fingerprint
  swapped = {k: v[[1, 0, 2, 3, 4, 5, 6, 7]] for k, v in batch.items()}
  assert int(jax.jit(batch_fingerprint)(swapped)) != fingerprint
  changed = dict(batch, inputs=batch["inputs"].copy())
  changed["inputs"][5, 3] += 1
  assert int(jax.jit(batch_fingerprint)(changed)) != fingerprint


def test_held_out_sets_of_all_processes_have_as_many_batches():
  """Shards of a small validation split give different numbers of batches (English: 3 and 4
  here); a multi-host evaluation step is collective, so the count is agreed across processes
  and the shorter set padded with zero-weight batches."""
  cfg = pipeline.DataConfig(
    mixture="polylm_pt_en", seq_len=128, batch_size=16, split="validation", shuffle=False
  )
  local = [len(pipeline.eval_batches(cfg, shard_index=i, num_shards=2)) for i in range(2)]
  assert local[0] != local[1]

  def agree(counts):  # what the allgather gives when every process has reported its counts
    return [max(c, *local) for c in counts]

  sets = [
    pipeline.HeldOutSets({"en": cfg}, shard_index=i, num_shards=2, agree=agree) for i in range(2)
  ]
  assert [len(s["en"]) for s in sets] == [max(local)] * 2
  padded = sets[local.index(min(local))]["en"][-1]
  assert padded["inputs"].shape == (8, 128) and padded["weights"].sum() == 0
  real = sum(float(b["weights"].sum()) for s in sets for b in s["en"])
  whole = sum(float(b["weights"].sum()) for b in pipeline.eval_batches(cfg, max_batches=8))
  assert real == whole  # padding adds no tokens; the shards together hold the split
