"""Multi-host set-up mistakes, with local processes: each stops every process with a message that
names what is wrong (exit status 2), within the configured time, never a hang."""

import os
import socket
import subprocess
import sys

import pytest
from runs import FEW_LANGUAGE_FLAGS, SHORT_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, workdir, *extra: str):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "polylm_jax.train",
      "--distributed",
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={process_id}",
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={workdir}",
      "--gin_bindings=TrainerConfig.num_steps = 2",
      *FEW_LANGUAGE_FLAGS,
      *extra,
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@pytest.mark.slow
def test_a_coordinator_nobody_reaches_and_processes_that_never_start_are_named(tmp_path):
  port = _free_port()
  # Process 1 of 2 with no process 0 anywhere; process 0 of 2 (another port) whose peer never
  # comes. Both stop after the timeout, saying which side is missing.
  alone_worker = _start(1, 2, port, tmp_path / "a", "--coordinator_timeout_s=5")
  alone_lead = _start(0, 2, _free_port(), tmp_path / "b", "--coordinator_timeout_s=5")
  worker_out = alone_worker.communicate(timeout=600)[0]
  lead_out = alone_lead.communicate(timeout=600)[0]
  assert alone_worker.returncode == 2, worker_out[-3000:]
  assert (
    f"process 1 of 2 did not join the run at 127.0.0.1:{port} within --coordinator_timeout_s=5"
    in worker_out
  )
  assert "is process 0 running" in worker_out
  assert alone_lead.returncode == 2, lead_out[-3000:]
  assert "not every process connected to it" in lead_out
  assert "Check failure stack trace" not in worker_out + lead_out


@pytest.mark.slow
def test_a_workdir_the_hosts_do_not_share_stops_every_process(tmp_path):
  # Two local processes given different directories: as two hosts whose --workdir is a local
  # path on each, not a shared filesystem.
  port = _free_port()
  procs = [_start(i, 2, port, tmp_path / f"host{i}") for i in range(2)]
  outs = [p.communicate(timeout=1800)[0] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], outs[0][-2000:] + outs[1][-2000:]
  for out in outs:
    assert "is not shared between the hosts: process(es) [1] cannot see the file" in out
  assert not list((tmp_path / "host0").glob(".shared-check-*"))  # the probe is cleaned up
  assert not (tmp_path / "host0" / "checkpoints").exists()  # stopped before anything was written


def _run_both(workdir, steps: int) -> list[str]:
  port = _free_port()
  settings = [
    f"--gin_bindings=TrainerConfig.num_steps = {steps}",
    "--gin_bindings=CheckpointConfig.every_steps = 2",
    *SHORT_FLAGS,
    "--gin_bindings=TrainerConfig.eval_every = 0",
  ]
  procs = [_start(i, 2, port, workdir, *settings) for i in range(2)]
  try:
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:  # a process left waiting on its peer: stopped, its output kept
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  return outs


@pytest.mark.slow
def test_a_checkpoint_only_one_host_finds_damaged_is_set_aside_by_all(tmp_path):
  """Process 1 reads data stream 1 only: damage there is seen by it alone. Both processes must
  act on it together (move the checkpoint aside once, resume from the previous one), not part
  ways with one waiting in the quarantine while the other trains."""
  workdir = tmp_path / "run"
  _run_both(workdir, 4)
  [stream] = (workdir / "data_state" / "4").glob("stream_1.data-*")
  stream.write_bytes(stream.read_bytes()[: stream.stat().st_size // 2])
  lead, worker = _run_both(workdir, 5)
  for out in (lead, worker):
    assert "resumed from checkpoint step 2" in out, out[-3000:]
  assert "another process found it damaged" in lead
  [moved] = (workdir / "corrupt").iterdir()
  assert moved.name.startswith("step_4-") and (moved / "data_state").is_dir()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 5]
