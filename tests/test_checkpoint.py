"""Checkpoints: exact resume, crash safety under SIGKILL, preemption, resharding on restore, the
keep policy, corrupt and mismatched checkpoints, and loss-spike handling."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from runs import FEW_LANGUAGE_FLAGS, SHORT_FLAGS, tiny_step

from polylm_jax import sharding
from polylm_jax.checkpoint.manager import CheckpointConfig, Checkpointer
from polylm_jax.config import PRESETS
from polylm_jax.errors import CheckpointMismatchError
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.train import train_cli as cli
from polylm_jax.trainer.step import TrainStep

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]
RUN = [
  "--gin_file=gin_configs/quickstart.gin",
  *SHORT_FLAGS,
  "--gin_bindings=TrainerConfig.log_every = 5",
  "--gin_bindings=TrainerConfig.eval_every = 0",
  *FEW_LANGUAGE_FLAGS,
]


def _bindings(**kv):
  return [f"--gin_bindings={k} = {v}" for k, v in kv.items()]


def _final(workdir, cfg=TINY, mesh_shape=(1, 1, 1)):
  """The newest checkpoint's state, restored on a mesh of the given shape."""
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices)
  ckpt = Checkpointer(workdir, CheckpointConfig(), tiny_step(model_config=cfg, mesh=mesh))
  state, meta = ckpt.restore(ckpt.steps()[-1], None)
  ckpt.close()
  return jax.device_get(state), meta


def _losses_by_step(workdir):
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    out[r["step"]] = r["loss"]  # a resumed run rewrites the steps it redoes: keep the last
  return out


def test_resume_continues_exactly(tmp_path):
  common = RUN + _bindings(**{"CheckpointConfig.every_steps": 4})
  cli.main(common + _bindings(**{"TrainerConfig.num_steps": 12}) + [f"--workdir={tmp_path / 'a'}"])
  cli.main(common + _bindings(**{"TrainerConfig.num_steps": 8}) + [f"--workdir={tmp_path / 'b'}"])
  result = cli.main(
    common + _bindings(**{"TrainerConfig.num_steps": 12}) + [f"--workdir={tmp_path / 'b'}"]
  )
  assert int(result["state"].step) == 12
  a, b = _losses_by_step(tmp_path / "a"), _losses_by_step(tmp_path / "b")
  assert [a[s] for s in range(9, 13)] == [b[s] for s in range(9, 13)]
  (sa, ma), (sb, mb) = _final(tmp_path / "a"), _final(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, sa, sb)
  assert ma["data_position"] == mb["data_position"] == 12
  assert "model_config.preset = 'tiny'" in ma["gin_config"]
  assert ma["model_config"]["d_model"] == TINY.d_model and ma["tokenizer_model_b64"]


def _launch(workdir, steps, log):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "polylm_jax.train",
      f"--workdir={workdir}",
      *RUN,
      *_bindings(**{"TrainerConfig.num_steps": steps, "CheckpointConfig.every_steps": 3}),
    ],
    cwd=REPO,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def _lines(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _has_checkpoint(workdir):
  root = pathlib.Path(workdir) / "checkpoints"
  return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_and_sigterm_at_random_moments_lose_nothing(tmp_path):
  """Killed (SIGKILL) three times, at random moments (async saves included), and preempted
  (SIGTERM) once, the run still finishes with parameters bitwise equal to an uninterrupted run's."""
  steps = 24
  with open(tmp_path / "ref.log", "w") as log:
    assert _launch(tmp_path / "ref", steps, log).wait(timeout=1800) == 0
  rng = random.Random(1234)
  work = tmp_path / "interrupted"
  with open(tmp_path / "run.log", "w") as log:
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
      proc = _launch(work, steps, log)
      start = _lines(work)
      wanted = start + rng.randint(2, 5)
      # Kill only once a checkpoint exists, so that every restart has something to resume from.
      # Waits on progress (metrics lines), however slow a loaded machine makes it.
      while (_lines(work) < wanted or not _has_checkpoint(work)) and proc.poll() is None:
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 0.6))
      if proc.poll() is None:
        proc.send_signal(sig)
      code = proc.wait(timeout=1800)
      if sig == signal.SIGTERM:
        assert code == 0  # a clean, checkpointed stop
    proc = _launch(work, steps, log)
    assert proc.wait(timeout=1800) == 0
  log_text = (tmp_path / "run.log").read_text()
  assert log_text.count("resumed from checkpoint") == 4  # every restart resumed
  assert "SIGTERM received" in log_text
  ref_state, ref_meta = _final(tmp_path / "ref")
  state, meta = _final(work)
  assert int(state.step) == steps and meta["data_position"] == ref_meta["data_position"] == steps
  jax.tree.map(np.testing.assert_array_equal, state, ref_state)
  ref_losses, losses = _losses_by_step(tmp_path / "ref"), _losses_by_step(work)
  assert [losses[s] for s in range(1, steps + 1)] == [ref_losses[s] for s in range(1, steps + 1)]


def test_restore_onto_other_meshes_and_device_counts(tmp_path, make_batch):
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 4, 1))
  step = tiny_step(mesh=mesh)
  state = step.init(0)
  state, _ = step(state, step.place_batch(make_batch(0, 8, 32, TINY.vocab_size)))
  saved = jax.device_get(state)

  class NoData:  # this test is about the model state only
    position = 0

    def save(self, directory):
      pathlib.Path(directory).mkdir(parents=True, exist_ok=True)

  ckpt = Checkpointer(tmp_path, CheckpointConfig(), step)
  ckpt.save(1, state, NoData(), {"model_config": TINY.__dict__})
  ckpt.close()
  for shape in ((1, 1, 1), (4, 1, 2)):
    devices = jax.devices()[: int(np.prod(shape))]
    other = TrainStep(
      model_config=TINY,
      optimizer_config=OptimizerConfig(warmup_steps=1),
      mesh=sharding.make_mesh(sharding.MeshConfig(*shape), devices),
      rules=sharding.DEFAULT_RULES,
      total_steps=10,
    )
    restorer = Checkpointer(tmp_path, CheckpointConfig(), other)
    restored, _ = restorer.restore(1, None)
    restorer.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    assert restored.params["wte"].sharding == other.param_shardings["wte"]
    assert len(restored.params["wte"].sharding.device_set) == int(np.prod(shape))


class _Positions:
  """A stand-in data iterator for tests about the checkpoint files themselves."""

  def __init__(self):
    self.position = 0

  def save(self, directory):
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(directory) / "process_0.index").write_text(str(self.position))

  def restore(self, directory, position):
    assert (pathlib.Path(directory) / "process_0.index").read_text() == str(position)
    self.position = position


def _saved_steps(tmp_path, steps, config):
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  step = tiny_step(mesh=mesh)
  state = step.init(0)
  ckpt = Checkpointer(tmp_path, config, step)
  data = _Positions()
  for s in steps:
    data.position = s
    ckpt.save(s, state, data, {"model_config": TINY.__dict__})
  ckpt.wait()
  return ckpt, step, state


def test_keep_last_k_plus_every_mth(tmp_path):
  ckpt, _, _ = _saved_steps(
    tmp_path, range(1, 11), CheckpointConfig(keep_last=2, keep_every=4, async_save=False)
  )
  assert ckpt.steps() == [4, 8, 9, 10]
  assert sorted(int(d.name) for d in (tmp_path / "data_state").iterdir()) == [4, 8, 9, 10]
  ckpt.close()


def test_no_data_state_outlives_its_checkpoint_after_asynchronous_saves(tmp_path):
  """The keep policy removes a checkpoint once the next asynchronous save completes; its data
  state goes by the time the checkpointer is closed (the end of a run)."""
  ckpt, _, _ = _saved_steps(tmp_path, range(1, 6), CheckpointConfig(keep_last=2))
  ckpt.close()
  assert sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir()) == [4, 5]
  assert sorted(int(d.name) for d in (tmp_path / "data_state").iterdir()) == [4, 5]


def test_partial_and_corrupt_checkpoints_are_never_restored(tmp_path, caplog):
  ckpt, _, _ = _saved_steps(tmp_path, (1, 2, 3), CheckpointConfig(keep_last=5))
  # An unfinished save (what a crash during an async save leaves): not listed, never chosen.
  partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
  partial.mkdir()
  (partial / "state").mkdir()
  assert ckpt.steps() == [1, 2, 3]
  # A damaged finished checkpoint: moved to corrupt/ (not deleted) with a message naming it; the
  # previous one is used.
  for f in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  data = _Positions()
  restored = ckpt.restore_latest(data)
  assert restored is not None
  assert int(restored[1]["step"]) == 2 and data.position == 2
  assert f"checkpoint {tmp_path / 'checkpoints' / '3'} is unreadable" in caplog.text
  assert ckpt.steps() == [1, 2]
  [moved] = (tmp_path / "corrupt").iterdir()
  assert (moved / "checkpoint" / "state").is_dir() and (moved / "data_state").is_dir()
  ckpt.close()


def test_checkpoint_of_another_model_names_the_mismatch(tmp_path):
  ckpt, _, _ = _saved_steps(tmp_path, (1,), CheckpointConfig())
  ckpt.close()
  other_cfg = TINY.replace(d_ff=128)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  other = Checkpointer(
    tmp_path,
    CheckpointConfig(),
    TrainStep(
      model_config=other_cfg,
      optimizer_config=OptimizerConfig(warmup_steps=1),
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      total_steps=10,
    ),
  )
  with pytest.raises(
    CheckpointMismatchError,
    match=r"\['blocks'\]\['mlp'\]\['fc_kernel'\]: checkpoint \(2, 64, 256\) vs "
    r"model \(2, 64, 128\)",
  ):
    other.restore_latest(None)
  other.close()
