"""Fault injection on checkpoints: the mistakes and accidents a real team has with a run's saved
state (damaged, unreadable or changed on resume; an export or import aimed at its own source),
and the outcome each must have. test_faults_saving.py: the faults of a running trainer.

Every case ends in one of two ways: the run resumes exactly, or it refuses with a message that
names the problem. Never a silent restart, never a deleted good checkpoint, never a deleted source.
"""

import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from runs import checkpointed_args

from polylm_jax import sharding
from polylm_jax.checkpoint.manager import CheckpointConfig, Checkpointer
from polylm_jax.config import PRESETS
from polylm_jax.errors import CheckpointMismatchError, NoUsableCheckpointError
from polylm_jax.export import export_cli, import_cli
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.train import train_cli as cli
from polylm_jax.trainer.step import TrainStep

pytestmark = pytest.mark.faults

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def _metrics(workdir):
  return [
    json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  ]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A 6-step run with checkpoints at steps 2, 4 and 6; tests work on copies of it."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  cli.main(checkpointed_args(workdir, 6))
  return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(base_run, copy)
  return copy


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


# --- restore -----------------------------------------------------------------------------------


def test_unreadable_checkpoints_are_moved_aside_and_the_run_never_starts_over(run_copy, caplog):
  ckpts = run_copy / "checkpoints"
  for f in _array_files(ckpts / "6"):
    _truncate(f)  # truncated array data
  shutil.rmtree(run_copy / "data_state" / "4")  # a missing data-iterator state
  _truncate(ckpts / "2" / "state" / "_METADATA")  # truncated tree metadata
  damaged = {s: _tree_digest(ckpts / s) for s in ("2", "4", "6")}
  with (
    caplog.at_level(logging.ERROR),
    pytest.raises(
      NoUsableCheckpointError, match="has no checkpoint that can be read.*--start_over"
    ),
  ):
    cli.main(checkpointed_args(run_copy, 8))
  for step in (2, 4, 6):
    assert f"checkpoint {ckpts / str(step)} is unreadable" in caplog.text
  assert not list(ckpts.iterdir())  # nothing left to resume from ...
  moved = {m.name.split("-")[0].removeprefix("step_"): m for m in (run_copy / "corrupt").iterdir()}
  assert sorted(moved) == ["2", "4", "6"]  # ... and nothing deleted: all in corrupt/, as it was
  for step, m in moved.items():
    assert _tree_digest(m / "checkpoint") == damaged[step]
  assert (moved["6"] / "data_state" / "stream_0.index").is_file()
  # A plain restart still refuses (the history is in corrupt/) ...
  with pytest.raises(NoUsableCheckpointError):
    cli.main(checkpointed_args(run_copy, 8))
  # ... until the user says so: the earlier run's files go to previous/, a new run starts.
  result = cli.main(checkpointed_args(run_copy, 4) + ["--start_over"])
  assert int(result["state"].step) == 4
  [previous] = (run_copy / "previous").iterdir()
  assert len(list((previous / "corrupt").iterdir())) == 3
  assert [r["step"] for r in _metrics(previous)] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in _metrics(run_copy)] == [1, 2, 3, 4]


def test_a_corrupt_newest_checkpoint_falls_back_and_the_run_goes_on_exactly(run_copy, caplog):
  losses = {r["step"]: r["loss"] for r in _metrics(run_copy)}
  for f in _array_files(run_copy / "checkpoints" / "6"):
    _truncate(f)
  with caplog.at_level(logging.INFO):
    result = cli.main(checkpointed_args(run_copy, 8))
  assert "resumed from checkpoint step 4" in caplog.text
  assert int(result["state"].step) == 8
  # Step 6 is saved again (no "step already exists" crash loop) and the redone steps are the
  # same steps: the metrics hold each step once, with the losses of the first attempt.
  assert sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir()) == [2, 4, 6, 8]
  records = _metrics(run_copy)
  assert [r["step"] for r in records] == list(range(1, 9))
  assert [r["loss"] for r in records[:6]] == [losses[s] for s in range(1, 7)]
  assert len(list((run_copy / "corrupt").iterdir())) == 1


def test_generating_from_a_damaged_checkpoint_says_so_in_one_line(run_copy):
  """The real error, naming the checkpoint, the tensor and the step to use instead; no trail of
  `Event loop is closed` reports from the reads still in flight; nothing moved."""
  for f in _array_files(run_copy / "checkpoints" / "6"):
    _truncate(f)
  before = _tree_digest(run_copy)
  proc = subprocess.run(
    [sys.executable, "-m", "polylm_jax.decode", f"--workdir={run_copy}", "--prompt=Hi"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"polylm-generate: checkpoint {run_copy}/checkpoints/6 is unreadable")
  assert "params." in last and last.endswith("the previous checkpoint: --step=4")
  assert _tree_digest(run_copy) == before


def test_a_config_change_on_resume_is_named_and_changes_nothing(run_copy):
  before = _tree_digest(run_copy)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "polylm_jax.train",
      *checkpointed_args(run_copy, 8, **{"OptimizerConfig.grad_clip_norm": 0.0}),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert last.startswith("polylm-train: error: CheckpointMismatchError")
  assert (
    "optimizer state: checkpoint has clip-by-global-norm, config has none "
    "(OptimizerConfig.grad_clip_norm = 0.0)"
  ) in last
  assert "TrainerConfig.reset_optimizer = True" in last
  assert "ERROR Path not found" not in proc.stderr  # gin's misleading include noise is gone
  after = _tree_digest(run_copy)
  assert before == after  # not one file changed (config.gin and metrics.jsonl included)


@pytest.mark.parametrize(
  "changed, named",
  [
    ({"DataConfig.shuffle": False}, "DataConfig.shuffle: checkpoint True, config False"),
    ({"DataConfig.batch_size": 16}, "DataConfig.batch_size: checkpoint 8, config 16"),
    ({"DataConfig.seq_len": 32}, "DataConfig.seq_len: checkpoint 64, config 32"),
    (
      {"train.curriculum": None, "DataConfig.mixture": "'polylm_sample'"},
      "data source: checkpoint 'a curriculum (train.curriculum)', config 'DataConfig.mixture'",
    ),
  ],
  ids=["shuffle", "batch_size", "seq_len", "mixture-for-curriculum"],
)
def test_a_data_setting_change_on_resume_is_named_and_moves_nothing(run_copy, changed, named):
  """Not a damaged checkpoint: refused at start naming the setting; every checkpoint stays, and
  the original settings still resume."""
  before = _tree_digest(run_copy)
  with pytest.raises(CheckpointMismatchError, match="was saved with other data settings") as e:
    cli.main(checkpointed_args(run_copy, 8, **changed))
  assert named in str(e.value) and "TrainerConfig.reset_data = True" in str(e.value)
  assert "nothing was changed on disk" in str(e.value)
  assert _tree_digest(run_copy) == before  # config.gin and metrics.jsonl included
  assert not (run_copy / "corrupt").exists()
  if "DataConfig.shuffle" in changed:  # (once: every case left the same files)
    result = cli.main(checkpointed_args(run_copy, 8))  # the original settings resume as ever
    assert int(result["state"].step) == 8


def test_reset_data_keeps_parameters_and_optimizer_and_starts_the_data_afresh(run_copy, caplog):
  changed = {"DataConfig.shuffle": False, "DataConfig.batch_size": 16}
  with caplog.at_level(logging.INFO):
    result = cli.main(
      checkpointed_args(run_copy, 8, **changed, **{"TrainerConfig.reset_data": True})
    )
  assert "the DATA STARTS AFRESH (TrainerConfig.reset_data)" in caplog.text
  assert "DataConfig.batch_size: checkpoint 8, config 16" in caplog.text
  assert "resumed from checkpoint step 6" in caplog.text
  state = result["state"]
  counts = [
    int(x)
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
    if "count" in jax.tree_util.keystr(path)
  ]
  assert int(state.step) == 8 and counts and set(counts) == {8}  # the optimizer's state went on
  records = _metrics(run_copy)
  assert [r["step"] for r in records] == list(range(1, 9))
  # The unshuffled pipeline from its start: the same batches as a new run with these settings.
  fresh = cli.main(checkpointed_args(run_copy.parent / "fresh", 2, **changed))
  assert [r["batch_fingerprint"] for r in records[6:8]] == [
    r["batch_fingerprint"] for r in _metrics(run_copy.parent / "fresh")
  ]
  del fresh
  caplog.clear()
  with caplog.at_level(logging.INFO):  # checkpoints saved since resume normally
    cli.main(checkpointed_args(run_copy, 10, **changed, **{"TrainerConfig.reset_data": True}))
  assert "resumed from checkpoint step 8" in caplog.text and "AFRESH" not in caplog.text


def test_a_read_error_is_retried_and_never_moves_a_checkpoint(run_copy, monkeypatch, caplog):
  """A storage error (a 503 from object storage) says nothing about the checkpoint: the read is
  retried; if it keeps failing the run stops naming it, and nothing is moved."""
  import orbax.checkpoint as ocp

  from polylm_jax.checkpoint import damage
  from polylm_jax.errors import CheckpointReadError

  monkeypatch.setattr(damage, "READ_RETRY_DELAY_S", 0.01)
  real = ocp.CheckpointManager.restore
  failures = {"left": 10**6}

  def flaky(self, *args, **kwargs):
    if failures["left"] > 0:
      failures["left"] -= 1
      raise OSError("GET https://storage.googleapis.com/...: 503 Service Unavailable")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
  before = _tree_digest(run_copy)
  with pytest.raises(CheckpointReadError, match="3 attempts.*nothing was moved"):
    cli.main(checkpointed_args(run_copy, 8))
  assert _tree_digest(run_copy) == before and not (run_copy / "corrupt").exists()
  failures["left"] = 2  # a storage hiccup: the third try reads it
  with caplog.at_level(logging.INFO):
    result = cli.main(checkpointed_args(run_copy, 8))
  assert "reading metadata failed (OSError: GET" in caplog.text and "trying again" in caplog.text
  assert "resumed from checkpoint step 6" in caplog.text and int(result["state"].step) == 8
  assert not (run_copy / "corrupt").exists()


def test_reset_optimizer_keeps_the_parameters_step_and_data_position(run_copy, caplog):
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  steps = {
    clip: TrainStep(
      model_config=TINY,
      optimizer_config=OptimizerConfig(warmup_steps=2, decay_steps=30, grad_clip_norm=clip),
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      total_steps=30,
    )
    for clip in (1.0, 0.0)
  }
  ckpt = Checkpointer(run_copy, CheckpointConfig(), steps[1.0])
  saved, _ = ckpt.restore(6, None)
  ckpt.close()
  ckpt = Checkpointer(run_copy, CheckpointConfig(), steps[0.0])
  with pytest.raises(CheckpointMismatchError, match="checkpoint has clip-by-global-norm"):
    ckpt.restore(6, None)
  fresh, _ = ckpt.restore(6, None, reset_optimizer=True)
  ckpt.close()
  assert int(fresh.step) == 6 and int(fresh.opt_state[0].count) == 0  # Adam starts over
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(fresh.params), jax.device_get(saved.params)
  )
  changed = {"OptimizerConfig.grad_clip_norm": 0.0, "TrainerConfig.reset_optimizer": True}
  with caplog.at_level(logging.INFO):
    cli.main(checkpointed_args(run_copy, 8, **changed))
  assert (
    "checkpoint step 6: parameters, step and data position restored with a FRESH" in caplog.text
  )
  caplog.clear()
  with caplog.at_level(logging.INFO):
    result = cli.main(checkpointed_args(run_copy, 10, **changed))
  # Checkpoints saved since match the new settings: later restarts resume them normally.
  assert int(result["state"].step) == 10 and "FRESH" not in caplog.text
  assert "resumed from checkpoint step 8" in caplog.text


# --- exports and imports over their own sources ------------------------------------------------


def test_exports_never_replace_their_source_or_anything_but_an_export(run_copy, tmp_path, capsys):
  before = _tree_digest(run_copy)
  step6 = run_copy / "checkpoints" / "6"
  for argv in (
    [f"--workdir={run_copy}", f"--out={run_copy}", "--overwrite"],
    [f"--checkpoint={step6}", f"--out={run_copy}", "--overwrite"],
    [f"--workdir={run_copy}", f"--out={run_copy / 'hf'}"],
  ):
    assert export_cli.main(argv) == 2
    assert "source" in capsys.readouterr().err
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "todo.txt").write_text("keep me")
  assert export_cli.main([f"--workdir={run_copy}", f"--out={notes}", "--overwrite"]) == 2
  assert "is not a Hugging Face export" in capsys.readouterr().err
  assert (notes / "todo.txt").read_text() == "keep me"
  assert _tree_digest(run_copy) == before
  # A good export, then a failed one over it: the good one stays, nothing partial is left.
  out = tmp_path / "hf"
  assert export_cli.main([f"--workdir={run_copy}", f"--out={out}"]) == 0
  good = _tree_digest(out)
  for f in _array_files(step6):
    _truncate(f)
  try:
    code = export_cli.main([f"--workdir={run_copy}", f"--out={out}", "--overwrite"])
  except Exception:  # noqa: BLE001 (however it fails, the earlier export must be intact)
    code = None
  assert code != 0
  assert _tree_digest(out) == good
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []
  # A refused export (tokenizer smaller than the vocabulary) writes nothing at all.
  meta_file = run_copy / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["model_config"]["vocab_size"] = 8192
  meta_file.write_text(json.dumps(meta))
  assert (
    export_cli.main([f"--checkpoint={meta_file.parent.parent}", f"--out={tmp_path / 'refused'}"])
    == 2
  )
  assert "pass --allow_vocab_padding" in capsys.readouterr().err
  assert not (tmp_path / "refused").exists()


def test_imports_never_replace_their_source(run_copy, tmp_path, capsys):
  hf = tmp_path / "hf"
  assert export_cli.main([f"--workdir={run_copy}", f"--out={hf}"]) == 0
  before = _tree_digest(hf)
  for out in (hf, hf / "init", tmp_path):
    assert import_cli.main([f"--hf_dir={hf}", f"--out={out}", "--overwrite"]) == 2
    assert "source" in capsys.readouterr().err
  assert _tree_digest(hf) == before
  assert import_cli.main([f"--hf_dir={hf}", f"--out={tmp_path / 'init'}"]) == 0
  assert import_cli.main([f"--hf_dir={hf}", f"--out={tmp_path / 'init'}", "--overwrite"]) == 0
  # A training checkpoint (or workdir) is also a valid start for a new run's parameters.
  result = cli.main(
    checkpointed_args(
      tmp_path / "new",
      1,
      **{"TrainerConfig.init_params_from": f"'{run_copy / 'checkpoints' / '6'}'"},
    )
  )
  reader = export_cli.on_disk.CheckpointReader(run_copy / "checkpoints" / "6")
  np.testing.assert_array_equal(np.asarray(result["state"].params["wte"]), reader.read(("wte",)))
