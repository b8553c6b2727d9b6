"""The cluster launch scripts, run here with stand-ins for gcloud and srun that record what they
were asked to do (no cloud, no cluster): every TPU worker is set up and started, SLURM starts one
trainer per node with the given gin files and workdir, and missing arguments are refused."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from runs import install_stamp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _recorder(tmp_path, name):
  log = tmp_path / f"{name}.log"
  tool = tmp_path / "bin" / name
  tool.parent.mkdir(exist_ok=True)
  tool.write_text(
    f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {shlex.quote(str(log))}\n'
    f"printf '\\036' >> {shlex.quote(str(log))}\n"  # one record per call
  )
  tool.chmod(0o755)
  return tool, log


def _calls(log):
  return [call.rstrip("\0").split("\0") for call in log.read_text().split("\036") if call]


def _in_git_checkout():
  return (ROOT / ".git").exists()


@pytest.mark.skipif(not _in_git_checkout(), reason="tpu_vm.sh ships `git archive HEAD`")
def test_tpu_vm_sets_up_and_starts_every_worker(tmp_path):
  gcloud, log = _recorder(tmp_path, "gcloud")
  run = subprocess.run(
    [
      "bash",
      str(ROOT / "launch/tpu_vm.sh"),
      "--tpu=pod1",
      "--zone=us-east5-a",
      "--workdir=/mnt/runs/13b run",
      "--gin_file=runs/pretrain.gin",
      "--gin_file=models/polylm_13b.gin",
      "--gin_bindings=MeshConfig.fsdp = -1",
    ],
    env=dict(os.environ, GCLOUD=str(gcloud)),
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr
  calls = _calls(log)
  assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"]] + [
    ["compute", "tpus", "tpu-vm", "ssh"]
  ] * 2
  assert all("--worker=all" in c and "--zone=us-east5-a" in c for c in calls)
  setup = next(a for a in calls[1] if a.startswith("--command="))
  assert "launch/tpu_worker_setup.sh" in setup
  start = next(a for a in calls[2] if a.startswith("--command="))
  words = shlex.split(start.split("nohup ", 1)[1].split(">", 1)[0])
  assert words == [
    "python",
    "-m",
    "polylm_jax.train",
    "--distributed",
    "--workdir=/mnt/runs/13b run",
    "--gin_file=runs/pretrain.gin",
    "--gin_file=models/polylm_13b.gin",
    "--gin_bindings=MeshConfig.fsdp = -1",
  ]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone=z", "--workdir=w", "--gin_file=g"], "--tpu=NAME is required"),
    (["--tpu=t", "--zone=z", "--gin_file=g"], "--workdir=DIR is required"),
    (["--tpu=t", "--zone=z", "--workdir=w"], "--gin_file"),
  ],
)
def test_tpu_vm_refuses_incomplete_arguments(tmp_path, args, message):
  gcloud, log = _recorder(tmp_path, "gcloud")
  run = subprocess.run(
    ["bash", str(ROOT / "launch/tpu_vm.sh"), *args],
    env=dict(os.environ, GCLOUD=str(gcloud)),
    capture_output=True,
    text=True,
  )
  assert run.returncode == 2 and message in run.stderr
  assert not log.exists()  # nothing was copied or started


def test_slurm_starts_one_trainer_per_node_with_the_gin_files(tmp_path):
  _, log = _recorder(tmp_path, "srun")
  env = dict(
    os.environ,
    PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    POLYLM_PYTHON=sys.executable,
    POLYLM_ROOT=str(ROOT),
    SLURM_JOB_NUM_NODES="4",
  )
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(
    [
      "bash",
      str(ROOT / "launch/slurm.sbatch"),
      "/shared/run1",
      "runs/pretrain.gin",
      "models/polylm_13b.gin",
      "--",
      "--gin_bindings=MeshConfig.fsdp = -1",
    ],
    env=env,
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr
  [call] = _calls(log)
  assert "--ntasks-per-node=1" in call and "--kill-on-bad-exit=1" in call
  trainer = call[call.index(sys.executable) :]
  assert trainer == [
    sys.executable,
    "-m",
    "polylm_jax.train",
    "--distributed",
    "--gin_file=runs/pretrain.gin",
    "--gin_file=models/polylm_13b.gin",
    "--workdir=/shared/run1",
    "--gin_bindings=MeshConfig.fsdp = -1",
  ]


def test_slurm_refuses_a_job_without_gin_files(tmp_path):
  _, log = _recorder(tmp_path, "srun")
  run = subprocess.run(
    ["bash", str(ROOT / "launch/slurm.sbatch"), "/shared/run1"],
    env=dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}"),
    capture_output=True,
    text=True,
  )
  assert run.returncode == 2 and "usage" in run.stderr and not log.exists()


def _jobset(*args, env=None):
  return subprocess.run(
    [sys.executable, str(ROOT / "launch/gke_jobset.py"), *args],
    capture_output=True,
    text=True,
    env=env,
  )


JOBSET_ARGS = [
  "--name=polylm-13b",
  "--slice=v5p-64",
  "--image=registry.example/polylm-jax:1",
  "--pvc=polylm-runs",
  "--workdir=/mnt/runs/13b",
  "--gin_file=runs/polylm_13b.gin",
  "--gin_bindings=MeshConfig.fsdp = -1",
]


def test_gke_jobset_places_one_trainer_per_tpu_host_of_the_slice(tmp_path):
  import json

  run = _jobset(*JOBSET_ARGS)
  assert run.returncode == 0, run.stderr
  jobset = json.loads(run.stdout)
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 8  # v5p-64: 32 chips, 4 per host
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "4x4x2",
  }
  (container,) = pod["containers"]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"] == [
    "polylm-train",
    "--distributed",
    "--workdir=/mnt/runs/13b",
    "--gin_file=runs/polylm_13b.gin",
    "--gin_bindings=MeshConfig.fsdp = -1",
  ]
  assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "polylm-runs"
  assert container["volumeMounts"][0]["mountPath"] == "/mnt/runs"
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 3

  # --apply hands the same manifest to kubectl.
  kubectl = tmp_path / "kubectl"
  received = tmp_path / "received.json"
  kubectl.write_text(f'#!/usr/bin/env bash\necho "$@" > {received}.args\ncat > {received}\n')
  kubectl.chmod(0o755)
  applied = _jobset(*JOBSET_ARGS, "--apply", env=dict(os.environ, KUBECTL=str(kubectl)))
  assert applied.returncode == 0, applied.stderr
  assert json.loads(received.read_text()) == jobset
  assert pathlib.Path(f"{received}.args").read_text().split() == ["apply", "-f", "-"]


@pytest.mark.parametrize(
  "change, message",
  [
    ("--slice=v5p-12", "--slice=v5p-12: not a known TPU slice"),
    ("--workdir=/home/me/run", "is not under --mount_path=/mnt/runs: every host must"),
    ("--gin_file=runs/polylm_13b.gin", "at least one --gin_file=... is required"),
    ("--pvc", "is a path: give the ReadWriteMany volume it is on (--pvc)"),
  ],
)
def test_gke_jobset_refuses_what_cannot_run(change, message):
  key = change.split("=")[0]
  args = [a for a in JOBSET_ARGS if not a.startswith(key + "=")]
  if key not in ("--gin_file", "--pvc"):
    args.append(change)
  run = _jobset(*args)
  assert run.returncode == 2 and message in run.stderr, run.stderr


def test_gke_jobset_with_a_gs_workdir_mounts_no_volume():
  import json

  args = [a for a in JOBSET_ARGS if not a.startswith(("--pvc=", "--workdir="))]
  run = _jobset(*args, "--workdir=gs://runs-bucket/13b")
  assert run.returncode == 0, run.stderr
  pod = json.loads(run.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
  assert "--workdir=gs://runs-bucket/13b" in pod["containers"][0]["command"]
  refused = _jobset(*args, "--workdir=gs://runs-bucket/13b", "--pvc=polylm-runs")
  assert refused.returncode == 2 and "--pvc is not used with it" in refused.stderr


@pytest.mark.parametrize(
  "given, exported",
  [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's own choice stands
  ],
)
def test_the_setup_asks_for_huge_pages_and_keeps_the_users_tunables(tmp_path, given, exported):
  """What launch/env.sh exports to the trainers it starts (a stand-in checkout whose .venv is
  installed already, so nothing is installed)."""
  root = tmp_path / "checkout"
  (root / "launch").mkdir(parents=True)
  (root / "launch" / "env.sh").write_text((ROOT / "launch" / "env.sh").read_text())
  for name in ("requirements.txt", "pyproject.toml"):
    (root / name).write_text("")
  venv = root / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "python").symlink_to(sys.executable)
  (venv / "activate").write_text("")
  (root / ".venv" / ".polylm-installed").write_text(install_stamp(root))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if given is not None:
    env["GLIBC_TUNABLES"] = given
  out = subprocess.run(
    ["bash", "-c", 'source launch/env.sh requirements.txt && printf %s "$GLIBC_TUNABLES"'],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout == exported
