"""A workdir on object storage (gs://), against a local GCS emulator (gcp-storage-emulator, in
memory, no network): the trainer writes checkpoints, data states, metrics, TensorBoard and configs
there, resumes exactly from it, quarantines a damaged checkpoint and sets an earlier run aside
there, and locks it against a second trainer."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from runs import FEW_LANGUAGE_FLAGS, SHORT_FLAGS

from polylm_jax import errors, sharding
from polylm_jax.checkpoint import on_disk
from polylm_jax.checkpoint.manager import orbax_path, set_aside_previous_run
from polylm_jax.config import ModelConfig
from polylm_jax.decode import loading
from polylm_jax.eval import eval_cli
from polylm_jax.export import export_cli, import_cli
from polylm_jax.io import locks, storage
from polylm_jax.model import params as P
from polylm_jax.train import train_cli as cli

EMULATOR = pathlib.Path(__file__).with_name("gcs_emulator.py")
BUCKET = "polylm-test"
RUN = [
  "--gin_file=gin_configs/quickstart.gin",
  *SHORT_FLAGS,
  "--gin_bindings=TrainerConfig.eval_every = 0",
  "--gin_bindings=CheckpointConfig.every_steps = 4",
  *FEW_LANGUAGE_FLAGS,
]


def _steps(n: int) -> list[str]:
  return [f"--gin_bindings=TrainerConfig.num_steps = {n}"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator's URL; gcsfs (fsspec) and tensorstore are pointed at it for the module."""
  port = _free_port()
  server = subprocess.Popen(
    [sys.executable, str(EMULATOR), "start", "--port", str(port), "--in-memory"]
    + ["--default-bucket", BUCKET, "-q"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f"http://localhost:{port}"
  saved = dict(os.environ)
  os.environ.update(
    STORAGE_EMULATOR_HOST=url,  # gcsfs
    TENSORSTORE_GCS_HTTP_URL=url,  # Orbax's array writes
    FSSPEC_GCS_TOKEN="anon",
  )
  try:
    while True:  # waits on the server itself: it is up when it accepts a connection
      if server.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited with status {server.returncode}")
      try:
        socket.create_connection(("localhost", port)).close()
        break
      except OSError:
        time.sleep(0.2)
    yield url
  finally:
    os.environ.clear()
    os.environ.update(saved)
    server.terminate()
    server.wait()


def _objects(prefix: str) -> list[str]:
  fs, p = storage.filesystem(prefix)
  fs.invalidate_cache()
  return [k[len(p) + 1 :] for k in fs.find(p)]


def _losses(workdir: str) -> dict[int, float]:
  return {
    r["step"]: (r["loss"], r["batch_fingerprint"])
    for r in map(json.loads, storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines())
  }


@pytest.mark.slow  # three runs and an evaluation against the emulator: a minute on 2 cores
def test_run_on_object_storage_resumes_and_quarantines(gcs, tmp_path, caplog, lm_eval_tasks):
  remote = f"gs://{BUCKET}/run"
  every_2 = ["--gin_bindings=CheckpointConfig.every_steps = 2"]
  cli.main(RUN + every_2 + _steps(8) + [f"--workdir={remote}"])
  written = _objects(remote)
  for expected in ("config.gin", "operative_config.gin", "metrics.jsonl"):
    assert expected in written
  assert any(k.startswith("tensorboard/events.out.tfevents") for k in written)
  assert any(k.startswith("checkpoints/8/state/") for k in written)
  assert any(k.startswith("data_state/8/") for k in written)
  assert "LOCK" not in written  # released at the end
  first = _losses(remote)

  # Checkpoints 4, 6, 8. The save of 8 cut short (no commit marker: a preempted run) and 6
  # damaged: 8 goes to unfinished/, 6 to corrupt/ (nothing deleted), the run resumes from 4, and
  # redoes steps 5-8 with the same losses and batches as before.
  fs, root = storage.filesystem(f"{remote}/checkpoints")
  fs.rm_file(f"{root}/8/commit_success.txt")
  for key in fs.find(f"{root}/6/state"):
    fs.pipe_file(key, b"garbage")
  result = cli.main(RUN + _steps(12) + [f"--workdir={remote}"])
  assert int(result["state"].step) == 12
  assert "checkpoint step 8 was not finished; moved to" in caplog.text
  assert "checkpoints/6 is unreadable" in caplog.text
  [unfinished] = storage.listdir(f"{remote}/unfinished")
  assert unfinished.startswith("step_8-")
  assert any(k.startswith("state/") for k in _objects(f"{remote}/unfinished/{unfinished}"))
  [moved] = storage.listdir(f"{remote}/corrupt")
  moved_keys = _objects(f"{remote}/corrupt/{moved}")
  assert moved.startswith("step_6-") and any(k.startswith("checkpoint/state/") for k in moved_keys)
  assert any(k.startswith("data_state/") for k in moved_keys)
  got = _losses(remote)
  assert sorted(got) == list(range(1, 13)) and all(got[s] == first[s] for s in range(1, 9))
  assert storage.listdir(f"{remote}/checkpoints") == ["12", "4", "8"]

  # Read back from gs:// without copying the workdir: polylm-export (tensor by tensor; to a local
  # directory and to the bucket, the same files) and polylm-generate's loader (the run's params).
  remote_step = on_disk.resolve_checkpoint(remote)
  assert remote_step.endswith("checkpoints/12")
  export_cli.export_checkpoint(remote_step, str(tmp_path / "hf"))
  out = f"gs://{BUCKET}/hf"
  export_cli.export_checkpoint(remote_step, out)
  fs, exported = storage.filesystem(out)
  names = sorted(f.name for f in (tmp_path / "hf").iterdir())
  assert storage.listdir(out) == names and "model.safetensors" in names
  for name in names:
    assert fs.cat_file(f"{exported}/{name}") == (tmp_path / "hf" / name).read_bytes(), name
  with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite"):
    export_cli.export_checkpoint(remote_step, out)
  export_cli.export_checkpoint(remote_step, out, overwrite=True)  # the earlier one is kept aside
  [replaced] = [n for n in storage.listdir(f"gs://{BUCKET}") if n.startswith("hf.replaced-")]
  assert storage.listdir(f"gs://{BUCKET}/{replaced}") == names == storage.listdir(out)
  # polylm-import of that export into the bucket: the run's parameters, where init_params_from
  # reads them; an earlier import is replaced only with --overwrite.
  init = f"gs://{BUCKET}/init"
  import_cli.import_checkpoint(tmp_path / "hf", init)
  assert storage.listdir(init) == ["meta.json", "params"]
  abstract = P.abstract_params(_meta_config(storage.read_text(f"{init}/meta.json")))
  imported = ocp.StandardCheckpointer().restore(orbax_path(f"{init}/params"), abstract)
  jax.tree.map(np.testing.assert_array_equal, imported, jax.device_get(result["state"].params))
  with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite"):
    import_cli.import_checkpoint(tmp_path / "hf", init)
  # polylm-eval from the bucket into the bucket: results, table and chart, then reused.
  tasks = lm_eval_tasks
  evaluation = [
    "run",
    f"--workdir={remote}",
    f"--out=gs://{BUCKET}/eval",
    "--tasks=polylm_test_mc_en",
    f"--include_path={tasks}",
    "--batch_size=8",
  ]
  assert eval_cli.main(evaluation) == 0
  results = json.loads(storage.read_text(f"gs://{BUCKET}/eval/results.json"))["tasks"]
  assert list(results) == ["polylm_test_mc_en"]
  assert "| run | en | avg |" in storage.read_text(f"gs://{BUCKET}/eval/results.md")
  assert storage.read_bytes(f"gs://{BUCKET}/eval/polylm_test_mc.png")[:4] == b"\x89PNG"
  with caplog.at_level(logging.INFO):
    assert eval_cli.main(evaluation) == 0
  assert "reusing 1 finished task(s)" in caplog.text

  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  loaded = loading.load(workdir=remote, mesh=mesh)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, result["state"].params)


def test_start_over_on_object_storage_sets_the_run_aside(gcs):
  workdir = f"gs://{BUCKET}/over"
  for key in ("checkpoints/4/state/a", "data_state/4/stream_0.index", "metrics.jsonl", "keep.txt"):
    storage.write_text(f"{workdir}/{key}", key)
  set_aside_previous_run(workdir)
  [previous] = storage.listdir(f"{workdir}/previous")
  assert sorted(_objects(workdir)) == [
    "keep.txt",  # not a file of the run's: left where it is
    f"previous/{previous}/checkpoints/4/state/a",
    f"previous/{previous}/data_state/4/stream_0.index",
    f"previous/{previous}/metrics.jsonl",
  ]
  assert storage.read_text(f"{workdir}/previous/{previous}/metrics.jsonl") == "metrics.jsonl"


def _meta_config(meta: str) -> ModelConfig:
  return ModelConfig.from_dict(json.loads(meta)["model_config"])


def _lock_from_another_process(workdir: str, stale_after_s: float):
  """Another trainer taking the lock; it exits holding it, as a crashed one would."""
  code = (
    "import sys; from polylm_jax.io import locks\n"
    "lock = locks.RemoteWorkdirLock(sys.argv[1], stale_after_s=float(sys.argv[2]))\n"
    "lock.acquire(); print(lock._token)\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code, workdir, str(stale_after_s)], capture_output=True, text=True
  )


def test_lock_on_object_storage(gcs):
  workdir = f"gs://{BUCKET}/locked"
  token = lambda: json.loads(storage.read_text(f"{workdir}/LOCK"))["token"]
  with locks.workdir_lock(workdir) as held:
    holder = json.loads(storage.read_text(f"{workdir}/LOCK"))
    assert holder["token"] == held._token and holder["host"] == socket.gethostname()
    second = _lock_from_another_process(workdir, 300.0)
    assert second.returncode != 0 and f"workdir {workdir} is in use" in second.stderr
    assert token() == held._token
    # A lock whose holder stopped refreshing it is stale: taken over, with a warning.
    taker = _lock_from_another_process(workdir, 0.0)
    assert taker.returncode == 0 and "is stale" in taker.stderr, taker.stderr
    assert token() == taker.stdout.strip()
  # The first holder's release leaves alone the lock that is no longer its own.
  assert token() == taker.stdout.strip()
  with locks.RemoteWorkdirLock(workdir, stale_after_s=0.0):
    pass
  assert not storage.exists(f"{workdir}/LOCK")


def test_lock_is_created_only_if_absent(gcs, monkeypatch):
  """Two trainers starting at once both find no lock; the create-only upload (a generation
  precondition) lets only the first one in."""
  workdir = f"gs://{BUCKET}/race"
  with locks.workdir_lock(workdir) as first:
    late = locks.RemoteWorkdirLock(workdir)
    # It looked for a lock just before the first trainer wrote one.
    monkeypatch.setattr(late, "_read", lambda: None)
    monkeypatch.setattr(storage, "exists", lambda url: False)
    with pytest.raises(errors.WorkdirLockedError, match=f"workdir {workdir} is in use"):
      late._take()
    monkeypatch.undo()
    assert json.loads(storage.read_text(f"{workdir}/LOCK"))["token"] == first._token


def test_unreachable_or_unknown_workdir_is_refused(gcs):
  with pytest.raises(errors.WorkdirError, match="--workdir=gs://no-such-bucket/run is not writ"):
    cli.check_workdir("gs://no-such-bucket/run")
  with pytest.raises(errors.WorkdirError, match="no filesystem for this URL"):
    cli.check_workdir("nosuchscheme://bucket/run")


def test_tokenizer_model_from_a_bucket(gcs):
  import base64

  from polylm_jax.checkpoint.manager import tokenizer_b64
  from polylm_jax.data import sample

  model = pathlib.Path(sample.TOKENIZER_MODEL).read_bytes()
  storage.write_bytes(f"gs://{BUCKET}/spm/polylm.model", model)
  assert base64.b64decode(tokenizer_b64(f"gs://{BUCKET}/spm/polylm.model")) == model
