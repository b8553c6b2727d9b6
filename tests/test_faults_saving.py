"""Fault injection while a run trains: saves that fail (a file-size limit, a full disk),
non-finite steps, a second trainer on the workdir, and data and settings that cannot work.
test_faults.py: faults of the checkpoints a run resumes from.

Every case ends in one of two ways: the run goes on (or resumes) exactly, or it refuses with a
message that names the problem. Never a silent restart, never a deleted good checkpoint.
"""

import json
import logging
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from runs import checkpointed_args, tiny_step

from polylm_jax import sharding
from polylm_jax.checkpoint.manager import CheckpointConfig, Checkpointer
from polylm_jax.config import PRESETS
from polylm_jax.errors import NonFiniteError, WorkdirLockedError
from polylm_jax.export import hf_export, import_cli
from polylm_jax.io import locks
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.train import train_cli as cli
from polylm_jax.trainer.loop import TrainerConfig, train

pytestmark = pytest.mark.faults

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


# --- saving ------------------------------------------------------------------------------------


def _train_in_a_subprocess(args, limit: str = "") -> subprocess.CompletedProcess:
  command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "polylm_jax.train", *args])
  return subprocess.run(
    ["bash", "-c", f"{limit}exec {command}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )


def test_a_failed_save_leaves_every_earlier_checkpoint_restorable(tmp_path):
  # The workdir on a small filesystem of its own (tmpfs), to fill it later.
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", disk])
  assert mounted.returncode == 0, "the full-disk case needs root to mount a small tmpfs"
  try:
    work = disk / "run"
    cli.main(checkpointed_args(work, 4))
    # A file-size limit: writes past 1000 KB fail (EFBIG), those of the data state (its
    # shuffle buffers) or of the Orbax arrays, whichever comes first.
    proc = _train_in_a_subprocess(checkpointed_args(work, 8), limit="ulimit -f 1000 && ")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "CheckpointSaveError: saving checkpoint step 6" in last, proc.stderr[-3000:]
    assert "earlier checkpoints are untouched: [2, 4]" in last
    ckpt = Checkpointer(work, CheckpointConfig(), tiny_step())
    assert ckpt.steps() == [2, 4]
    for s in (2, 4):
      state, meta = ckpt.restore(s, None)
      assert int(state.step) == s and (work / "data_state" / str(s) / "stream_0.index").is_file()
    ckpt.close()
    # A full disk (256 KB left): the save fills it, then every write fails, the TensorBoard
    # writer's too; the last line still says what was saved and what was not.
    used = os.statvfs(disk)
    used_kb = (used.f_blocks - used.f_bfree) * used.f_frsize // 1024
    subprocess.run(["mount", "-o", f"remount,size={used_kb + 256}k", disk], check=True)
    proc = _train_in_a_subprocess(checkpointed_args(work, 8))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "No space left on device" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
      "CheckpointSaveError: saving checkpoint step 6" in last
      and "earlier checkpoints are untouched: [2, 4]" in last
    ) or "checkpoints saved: steps [2, 4]" in last, proc.stderr[-3000:]
    subprocess.run(["mount", "-o", "remount,size=200m", disk], check=True)
    result = cli.main(checkpointed_args(work, 8))  # and the run goes on once there is room
    assert int(result["state"].step) == 8
  finally:
    subprocess.run(["umount", disk], check=True)


class _ListBatches:
  """Resumable batches from a list (the checkpoint files are what this test is about)."""

  def __init__(self, batches):
    self.batches, self.position = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batches[self.position]
    self.position += 1
    return batch

  def save(self, directory):
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(directory) / "position").write_text(str(self.position))

  def restore(self, directory, position):
    self.position = position


def test_no_checkpoint_during_a_nonfinite_streak(tmp_path, make_batch, caplog):
  good = [make_batch(i, 8, 32, TINY.vocab_size) for i in range(2)]
  bad = []
  for i in range(4):  # token ids past the vocabulary: NaN embeddings, NaN loss
    b = make_batch(10 + i, 8, 32, TINY.vocab_size)
    b["inputs"][:] = TINY.vocab_size + 7
    bad.append(b)
  with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError):
    train(
      TINY,
      OptimizerConfig(warmup_steps=1, decay_steps=30),
      sharding.MeshConfig(data=-1),
      TrainerConfig(num_steps=6, max_nonfinite_in_a_row=3, tensorboard=False),
      _ListBatches(good + bad),
      str(tmp_path),
      checkpoint=CheckpointConfig(every_steps=1, keep_last=2, async_save=False),
    )
  # Steps 3-5 had non-finite updates: no checkpoint of them rotated the good ones out.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
  assert "no checkpoint at step 3: 1 non-finite update(s) in a row" in caplog.text


def test_nonfinite_weights_are_never_saved_exported_or_imported(tmp_path):
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  step = tiny_step(mesh=mesh)
  state = step.init(0)
  assert step.is_finite(state)
  params = jax.tree.map(np.array, jax.device_get(state.params))  # writable copies
  params["blocks"]["mlp"]["fc_bias"][1, 3] = np.nan
  assert not step.is_finite(state.replace(params=jax.device_put(params)))
  with pytest.raises(ValueError, match=r"tensor transformer.h.1.mlp.c_fc.bias has 1 non-finite"):
    hf_export.export_params(params, TINY, tmp_path / "hf")
  assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.partial-*"))
  out = hf_export.export_params(params, TINY, tmp_path / "hf", allow_nonfinite=True)
  with pytest.raises(ValueError, match=r"h.1.mlp.c_fc.bias has 1 non-finite.*--allow_nonfinite"):
    import_cli.import_checkpoint(out, tmp_path / "init")
  assert not (tmp_path / "init").exists()


# --- one trainer per workdir -------------------------------------------------------------------


def test_a_second_trainer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, caplog):
  work = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  first = subprocess.Popen(
    [sys.executable, "-m", "polylm_jax.train", *checkpointed_args(work, 400)],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    while not (work / "LOCK").is_file() and first.poll() is None:
      time.sleep(0.2)  # wait for progress: the first trainer has started
    assert first.poll() is None
    second = subprocess.run(
      [sys.executable, "-m", "polylm_jax.train", *checkpointed_args(work, 400)],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=1800,
    )
    assert second.returncode == 1
    assert f"is in use by another trainer: pid {first.pid}" in second.stderr.splitlines()[-1]
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  lock = json.loads((work / "LOCK").read_text())  # left behind by the killed trainer
  assert lock["pid"] == first.pid
  with caplog.at_level(logging.WARNING):
    cli.main(checkpointed_args(work, 2))
  assert f"is stale (its process {first.pid} is not running)" in caplog.text
  assert not (work / "LOCK").exists()  # released at the end


def test_lock_staleness_on_a_shared_filesystem(tmp_path):
  lock_path = tmp_path / "LOCK"
  info = {"host": "another-host", "pid": 1, "token": "x", "started": "then", "command": "train"}
  lock_path.write_text(json.dumps(info))
  with pytest.raises(WorkdirLockedError, match="pid 1 on another-host"):
    locks.WorkdirLock(tmp_path).acquire()  # fresh heartbeat: in use
  old = time.time() - 3600
  os.utime(lock_path, (old, old))
  with locks.WorkdirLock(tmp_path):  # no heartbeat for an hour: stale
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    with locks.WorkdirLock(tmp_path):  # the same process may nest it
      pass
    assert lock_path.exists()
  assert not lock_path.exists()
  # A lock on this host that no trainer wrote (a non-numeric pid): stale, taken over.
  import socket

  lock_path.write_text(json.dumps(dict(info, host=socket.gethostname(), pid="abc")))
  with locks.WorkdirLock(tmp_path):
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()


def test_a_truncated_safetensors_file_is_named(tmp_path):
  from polylm_jax.export import safetensors_io

  path = tmp_path / "model.safetensors"
  w = np.ones((64, 64), np.float32)
  source = safetensors_io.TensorSource("w", w.shape, w.dtype, lambda: iter([w]))
  safetensors_io.write_sharded(tmp_path, [source], max_shard_bytes=2**30)
  assert [n for n, _ in safetensors_io.read_dir(tmp_path)] == ["w"]
  data = path.read_bytes()
  for cut in (len(data) // 2, 12, 4):
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=f"{path}: not a complete safetensors file"):
      list(safetensors_io.read_dir(tmp_path))


# --- data and settings that cannot work --------------------------------------------------------


def _corpus_gin(tmp_path, pattern, record_format, text_field="text"):
  gin_file = tmp_path / "mine.gin"
  gin_file.write_text(f"""
include 'quickstart.gin'
train.corpora = @TextCorpora()
TextCorpora.files = {{'th': {{'train': '{pattern}'}}}}
TextCorpora.record_format = '{record_format}'
TextCorpora.text_field = '{text_field}'
TextCorpora.prefix = 'faults_'
Curriculum.stages = [@only/Stage()]
only/Stage.rates = {{'faults_th': 0.5, 'en': 0.5}}
""")
  return [f"--gin_file={gin_file}"] + checkpointed_args(tmp_path / "run", 4)[1:]


def test_data_that_yields_nothing_fails_at_start_naming_task_files_and_drops(tmp_path):
  lines = [json.dumps({"content": f"sentence {i}"}) for i in range(50)]
  (tmp_path / "th.jsonl").write_text("\n".join(lines))
  with pytest.raises(
    ValueError,
    match=r"task 'faults_th' yields no train documents \(read from "
    r"\['.*th\.jsonl'\]\); records dropped: "
    r"\{'missing_field': 50\}",
  ):
    cli.main(_corpus_gin(tmp_path, tmp_path / "th.jsonl", "jsonl", text_field="text"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(
    ValueError,
    match=r"task 'faults_th' yields no train documents \(read from "
    r"\['.*empty\.txt'\]\); records dropped: none",
  ):
    cli.main(_corpus_gin(tmp_path, tmp_path / "empty.txt", "text"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_types_and_impossible_settings_name_the_setting(tmp_path):
  with pytest.raises(
    TypeError, match=r"TrainerConfig.num_steps = 'forty': expected int \| None, got str"
  ):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        "--gin_bindings=TrainerConfig.num_steps = 'forty'",
      ]
    )
  with pytest.raises(
    SystemExit,
    match=r"decay_steps \(10, or the run's total steps\) must exceed "
    r"warmup_steps \(30\)",
  ):
    cli.main(
      [
        "--gin_file=gin_configs/quickstart.gin",
        f"--workdir={tmp_path}",
        "--gin_bindings=TrainerConfig.num_steps = 10",
      ]
    )
  assert not (tmp_path / "config.gin").exists()
