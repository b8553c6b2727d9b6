"""`polylm-sweep`: train a grid of variants, evaluate each, and compare them.

  polylm-sweep run --sweep=sweeps/curriculum_cpu.gin --dir=sweeps/curriculum
  polylm-sweep run --sweep=sweeps/curriculum_1.7b.gin --dir=gs://bucket/sweeps/curriculum \\
      --launch=slurm --launch_args='--nodes=16'   (prints one job per arm; --submit runs them)
  polylm-sweep report sweeps/curriculum

`run` checks every arm's configuration first (a bad grid stops before anything trains), records
the sweep in <dir>/sweep.json (a directory holding another sweep is refused), then trains and
evaluates the arms one after another, each an ordinary polylm-train run in <dir>/arms/<arm>
(a finished arm is skipped, an interrupted one resumes), and writes <dir>/report/. `report`
rewrites the report from what is there. docs/experiments.md describes sweep files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys

from polylm_jax import console, errors


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="polylm-sweep",
    description=console.summary(__doc__),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="check, train and evaluate every arm, then report")
  run.add_argument("--sweep", required=True, help="a gin file of Sweep.* bindings")
  run.add_argument("--dir", required=True, help="the sweep directory (local or gs://)")
  run.add_argument(
    "--sweep_bindings", action="append", default=[], help="a Sweep.* binding (repeatable)"
  )
  run.add_argument(
    "--launch",
    default=None,
    choices=["slurm", "gke", "tpu_vm"],
    help="print one training job per arm for this launcher (launch/README.md) instead",
  )
  run.add_argument(
    "--launch_args", default="", help="the launcher's own flags, e.g. '--slice=v5p-128 --image=...'"
  )
  run.add_argument("--submit", action="store_true", help="with --launch: run the printed commands")
  report = sub.add_parser("report", help="write <dir>/report/ from the arms' results")
  report.add_argument("dir")
  return parser


def _run(args) -> int:
  from polylm_jax.io import storage
  from polylm_jax.sweep import report, runner, spec

  sweep = spec.load(args.sweep, args.sweep_bindings)
  arms = runner.prepare(sweep, args.dir)
  logging.info("sweep %s: %d arm(s): %s", args.dir, len(arms), ", ".join(a.name for a in arms))
  if args.launch:
    if args.submit:
      runner.make_tokenizers(sweep, args.dir)  # the jobs need them (vocabulary arms)
    for size in sweep.vocab_sizes:
      if not storage.exists(runner.tokenizer_path(args.dir, size)):
        print(shlex.join(["polylm-tokenizer", *runner.tokenizer_args(sweep, args.dir, size)]))
    commands = runner.launch_commands(
      sweep, args.dir, arms, args.launch, shlex.split(args.launch_args)
    )
    for command in commands:
      print(command)
      if args.submit and subprocess.run(command, shell=True, check=False).returncode != 0:
        raise errors.TrainingError(f"submitting failed: {command}")
    print(
      f"# when the jobs are done: polylm-sweep run --sweep={args.sweep} --dir={args.dir} "
      "evaluates the arms (their training is complete) and writes the report",
      file=sys.stderr,
    )
    return 0
  runner.run_arms(sweep, args.dir, arms)
  print(report.write(sweep, args.dir))
  return 0


def _report(args) -> int:
  from polylm_jax.io import storage
  from polylm_jax.sweep import report, spec

  record = storage.join(args.dir, "sweep.json")
  if not storage.exists(record):
    raise FileNotFoundError(f"{args.dir}: no sweep.json (not a sweep directory)")
  sweep = spec.Sweep(**json.loads(storage.read_text(record)))
  print(report.write(sweep, args.dir))
  return 0


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  console.quiet_logging()
  try:
    return {"run": _run, "report": _report}[args.command](args)
  except errors.PolyLMError as e:
    print(f"polylm-sweep: {e}", file=sys.stderr)
    return e.exit_status
  except (ValueError, FileNotFoundError) as e:
    print(f"polylm-sweep: {e}", file=sys.stderr)
    return 2


def console_main() -> None:
  sys.exit(main())
