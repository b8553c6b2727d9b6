"""polylm-sweep: arms from a grid and seeds, refusals before anything trains (a bad grid, a
directory holding another sweep), launcher jobs, the comparison report, and (slow) a real sweep
killed mid-arm that resumes and reports."""

import base64
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest
from runs import FEW_LANGUAGES, SHORT_BINDINGS

from polylm_jax.data import sample
from polylm_jax.errors import ConfigError
from polylm_jax.sweep import report, runner, spec, sweep_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU = "sweeps/curriculum_cpu.gin"
TINY = (
  "Sweep.bindings = ['TrainerConfig.num_steps = 8', 'final/Stage.start_step = 4', "
  "'TrainerConfig.eval_every = 4', 'CheckpointConfig.every_steps = 4', "
  + ", ".join(f"'{b}'" for b in SHORT_BINDINGS)
  + ", "
  + ", ".join(f'"{b}"' for b in FEW_LANGUAGES)
  + "]"
)


def _tree(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_cpu_curriculum_sweep_has_four_shares_times_two_seeds():
  sweep = spec.load(CPU)
  arms = spec.arms(sweep)
  assert [a.name for a in arms[:3]] == [
    "rates=en0.7__seed=0",
    "rates=en0.7__seed=1",
    "rates=en0.55__seed=0",
  ]
  assert len(arms) == 8 and len({a.group for a in arms}) == 4
  last = arms[-1]
  assert last.bindings[-3:] == (
    "final/Stage.rates = {'en': 0.25}",
    "TrainerConfig.seed = 1",
    "DataConfig.seed = 1",
  )
  assert "TrainerConfig.num_steps = 300" in last.bindings
  assert spec.baseline_group(sweep) == "rates=en0.7"
  # Another file of the same grid names its arms the same way on every start.
  assert [a.name for a in spec.arms(spec.load(CPU))] == [a.name for a in arms]


@pytest.mark.parametrize(
  "binding, message",
  [
    (
      "Sweep.grid = {'final/Stage.rats': [{'en': 0.7}, {'en': 0.4}]}",
      "arm rats=en0.7__seed=0: gin configuration error: Configurable 'Stage' doesn't have a "
      "parameter named 'rats'",
    ),
    (
      "Sweep.grid = {'final/Stage.rates': [0.7, 0.4]}",
      "arm rates=0.7__seed=0: final/Stage.rates = 0.7:",
    ),
    ("Sweep.grid = {'TrainerConfig.seed': [1, 2]}", "seeds are Sweep.seeds"),
    ("Sweep.baseline = {'final/Stage.rates': {'en': 0.5}}", "is not one of the grid's values"),
    ("Sweep.seeds = []", "Sweep.seeds = []: give one or more distinct seeds"),
  ],
)
def test_a_bad_grid_is_refused_before_anything_is_written(tmp_path, capsys, binding, message):
  target = tmp_path / "sweep"
  bindings = [f"--sweep_bindings={binding}"]
  if binding.startswith("Sweep.grid"):
    bindings.append("--sweep_bindings=Sweep.baseline = None")
  assert sweep_cli.main(["run", f"--sweep={CPU}", f"--dir={target}", *bindings]) == 2
  err = capsys.readouterr().err
  assert message in err, err
  assert not target.exists()


def test_a_directory_holding_another_sweep_or_other_files_is_refused(tmp_path, capsys):
  target = tmp_path / "sweep"
  runner.prepare(spec.load(CPU), str(target))
  saved = _tree(target)
  other = "Sweep.grid = {'final/Stage.rates': [{'en': 0.7}, {'en': 0.1}]}"
  assert (
    sweep_cli.main(["run", f"--sweep={CPU}", f"--dir={target}", f"--sweep_bindings={other}"]) == 2
  )
  err = capsys.readouterr().err
  assert f"{target} holds another sweep (sweep.json): grid: this directory's" in err
  assert "{'en': 0.1}" in err and _tree(target) == saved
  workdir = tmp_path / "a_training_run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("{}\n")
  assert sweep_cli.main(["run", f"--sweep={CPU}", f"--dir={workdir}"]) == 2
  assert "is not empty and holds no sweep.json" in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == ["metrics.jsonl"]


def test_launch_prints_one_job_per_arm_that_the_launchers_take(tmp_path, capsys):
  target = tmp_path / "sweep"
  # The sweep directory on the cluster's shared volume (mounted where it is here).
  extra = f"--slice=v5p-8 --image=registry/polylm-jax:1 --pvc=runs --mount_path={tmp_path}"
  assert (
    sweep_cli.main(
      ["run", f"--sweep={CPU}", f"--dir={target}", "--launch=gke", f"--launch_args={extra}"]
    )
    == 0
  )
  gke = capsys.readouterr().out.strip().splitlines()
  assert len(gke) == 8
  # The GKE launcher builds its manifest from the printed command as it is.
  manifest = subprocess.run(
    [sys.executable, *shlex.split(gke[-1])[1:]], cwd=REPO, capture_output=True, text=True
  )
  assert manifest.returncode == 0, manifest.stderr
  text = manifest.stdout
  assert f"--workdir={target}/arms/rates=en0.25__seed=1" in text
  assert "final/Stage.rates = {'en': 0.25}" in text and "DataConfig.seed = 1" in text
  for launcher, start in (
    ("slurm", "sbatch --job-name=sweep-rates-en0-7-seed-0 launch/slurm.sbatch"),
    ("tpu_vm", "bash launch/tpu_vm.sh"),
  ):
    assert sweep_cli.main(["run", f"--sweep={CPU}", f"--dir={target}", f"--launch={launcher}"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith(start), first
    assert f"{target}/arms/rates=en0.7__seed=0" in first and "quickstart.gin" in first
  argv = shlex.split(first)
  assert "--gin_bindings=TrainerConfig.seed = 0" in argv


def test_vocabulary_arms_train_a_tokenizer_each_and_bind_it(tmp_path, capsys):
  sweep = spec.load("sweeps/vocabulary_cpu.gin")
  arms = spec.arms(sweep)
  assert [a.name for a in arms[::2]] == [
    "vocab=2048__seed=0",
    "vocab=4096__seed=0",
    "vocab=8192__seed=0",
  ]
  assert spec.baseline_group(sweep) == "vocab=8192"
  target = tmp_path / "sweep"
  bindings = runner.arm_bindings(arms[0], str(target))
  assert bindings[-2:] == [
    f"train.tokenizer = '{target}/tokenizers/vocab=2048.model'",
    "model_config.vocab_size = 2048",
  ]
  assert (
    sweep_cli.main(
      ["run", "--sweep=sweeps/vocabulary_cpu.gin", f"--dir={target}", "--launch=slurm"]
    )
    == 0
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == (
    "polylm-tokenizer train --sample --character_coverage=0.995 --vocab_size=2048 "
    f"--out={target}/tokenizers/vocab=2048.model"
  )
  assert len(lines) == 3 + 6 and "model_config.vocab_size = 8192" in lines[-1]
  # A balanced tokenizer per size instead (polylm-tokenizer balance and its flags).
  balanced = spec.Sweep(
    gin_files=["quickstart.gin"],
    vocab_sizes=[4096],
    tokenizer_command="balance",
    tokenizer_flags=["--sample", "--dev_dir=dev"],
  )
  assert runner.tokenizer_args(balanced, "d", 4096) == [
    "balance",
    "--sample",
    "--dev_dir=dev",
    "--vocab_size=4096",
    "--out=d/tokenizers/vocab=4096.model",
  ]
  with pytest.raises(ConfigError, match="Sweep.tokenizer_command = 'bpe': 'train' or 'balance'"):
    spec.check(spec.Sweep(gin_files=["quickstart.gin"], tokenizer_command="bpe"))
  # The pod-scale file needs the tokenizer corpus named.
  assert (
    sweep_cli.main(["run", "--sweep=sweeps/vocabulary_1.7b.gin", f"--dir={tmp_path / 'x'}"]) == 2
  )
  assert "Sweep.tokenizer_flags" in capsys.readouterr().err


def _results(target: pathlib.Path, arm: spec.Arm, en: float, th: float, de: float) -> None:
  out = target / "eval" / arm.name
  out.mkdir(parents=True)
  tasks = {
    f"heldout_{lang}": {"family": "heldout", "language": lang, "metric": "bpb", "value": value}
    for lang, value in (("en", en), ("th", th), ("de", de))
  }
  (out / "results.json").write_text(json.dumps({"tasks": tasks}))


def test_the_report_sets_changes_against_the_baseline_and_seed_noise(tmp_path):
  sweep = spec.Sweep(
    gin_files=["quickstart.gin"],
    grid={"final/Stage.rates": [{"en": 0.7}, {"en": 0.4}]},
    seeds=[0, 1],
  )
  target = tmp_path / "sweep"
  target.mkdir()
  base0, base1, arm0, arm1 = spec.arms(sweep)
  _results(target, base0, en=2.00, th=3.00, de=2.50)
  _results(target, base1, en=2.02, th=3.02, de=2.52)
  # English: +0.03 and -0.01 on the two seeds (noise); non-English: -0.1 on both (better).
  _results(target, arm0, en=2.03, th=2.80, de=2.50)
  _results(target, arm1, en=2.01, th=2.82, de=2.52)
  text = report.write(sweep, str(target))
  assert "| rates=en0.7 | 2.010 ± 0.014 | 2.760 ± 0.014 |" in text
  assert "| rates=en0.4 | +0.010 ~ | -0.100 |" in text
  assert "- `rates=en0.4`, en: +0.010 bits per byte (within seed noise)" in text
  assert "- `rates=en0.4`, non-en mean: -0.100 bits per byte (beyond seed noise)" in text
  assert (target / "report" / "change.png").read_bytes()[:4] == b"\x89PNG"
  one_seed = spec.Sweep(gin_files=["quickstart.gin"], grid=sweep.grid, seeds=[0])
  assert "no estimate of seed noise" in report.markdown(
    one_seed, str(target), report.collect(one_seed, str(target))
  )


@pytest.mark.slow
def test_a_sweep_killed_mid_arm_skips_the_finished_one_resumes_it_and_reports(tmp_path):
  target = tmp_path / "sweep"
  heldout = tmp_path / "heldout"  # two languages keep each arm's evaluation short
  heldout.mkdir()
  for lang in ("en", "th"):
    (heldout / f"{lang}.txt").write_text("\n".join(sample.sample_lines(lang, "validation")[:8]))
  argv = [
    sys.executable,
    "-m",
    "polylm_jax.sweep",
    "run",
    f"--sweep={CPU}",
    f"--dir={target}",
    f"--sweep_bindings={TINY}",
    "--sweep_bindings=Sweep.seeds = [0]",
    "--sweep_bindings=Sweep.grid = {'final/Stage.rates': [{'en': 0.7}, {'en': 0.25}]}",
    f"--sweep_bindings=Sweep.heldout = '{heldout}'",
    # One vocabulary arm: its tokenizer is trained first, and both arms train with it.
    "--sweep_bindings=Sweep.vocab_sizes = [1024]",
    "--sweep_bindings=Sweep.tokenizer_flags = ['--sample', '--character_coverage=0.98']",
    "--sweep_bindings=Sweep.baseline = None",
  ]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  first = subprocess.Popen(
    argv,
    cwd=REPO,
    env=env,
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.STDOUT,
  )
  arm1 = target / "arms" / "vocab=1024__rates=en0.7__seed=0"
  arm2 = target / "arms" / "vocab=1024__rates=en0.25__seed=0"
  while not (arm2 / "checkpoints" / "4" / "commit_success.txt").exists() and first.poll() is None:
    time.sleep(0.5)
  os.killpg(first.pid, signal.SIGKILL)  # the sweep and the second arm's trainer, mid-arm
  first.wait()
  assert (target / "eval" / arm1.name / "results.json").is_file()
  assert not (target / "eval" / arm2.name).exists()
  done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert f"{arm1} is complete" in done.stderr  # nothing trained again
  assert "resumed from checkpoint step 4" in done.stderr
  metrics = (arm2 / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in metrics] == list(range(1, 9))
  meta = json.loads((arm2 / "checkpoints" / "8" / "meta" / "metadata").read_text())
  tokenizer = (target / "tokenizers" / "vocab=1024.model").read_bytes()
  assert base64.b64decode(meta["tokenizer_model_b64"]) == tokenizer
  assert meta["model_config"]["vocab_size"] == 1024
  text = (target / "report" / "report.md").read_text()
  assert "Not evaluated yet" not in text and "| vocab=1024__rates=en0.25 |" in text
  assert "| arm | en | non-en mean | th |" in text
  assert (target / "report" / "learning_curves.png").is_file()
