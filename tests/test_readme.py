"""The README's commands, run verbatim as a new user runs them: in a copy of the checkout (the
commands write `workdir/...` beside it), one after another, each the text the README shows."""

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
from runs import install_stamp

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
pytestmark = pytest.mark.slow


def _blocks(text: str) -> list[str]:
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _block_with(needle: str, text: str = README) -> str:
  [block] = [b for b in _blocks(text) if needle in b]
  return block


def _command_line(block: str, starts: str) -> str:
  """One command of a block (with its continuation lines), without its trailing comment."""
  lines = block.splitlines()
  i = next(i for i, line in enumerate(lines) if line.startswith(starts))
  command = [lines[i]]
  while command[-1].rstrip().endswith("\\"):
    i += 1
    command.append(lines[i])
  text = "\n".join(command)
  return re.sub(r"\s+#[^'\"\n]*$", "", text)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  """A copy of the checkout sharing its installed .venv (the install step is the same)."""
  root = tmp_path_factory.mktemp("readme") / "polylm-jax"
  shutil.copytree(
    REPO,
    root,
    ignore=shutil.ignore_patterns(
      ".git", ".venv", "workdir*", "__pycache__", ".pytest_cache", ".mypy_cache"
    ),
  )
  (root / ".venv").symlink_to(REPO / ".venv")
  # launch/env.sh skips pip for requirement files already installed into this .venv (a re-run):
  # the test suite's install holds requirements.txt's. Without this line it would install the
  # package again, editable, from this copy, into the shared .venv.
  with open(REPO / ".venv" / ".polylm-installed", "a") as stamp:
    stamp.write(install_stamp(root))
  return root


def _run(checkout, script: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    ["bash", "-ec", script],
    cwd=checkout,
    input=stdin,
    capture_output=True,
    text=True,
    timeout=3000,
    env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  assert proc.returncode == 0, f"{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc


def test_the_readme_commands_work_as_written(checkout):
  # The main job: installs (already done here: the same requirement files) and trains.
  quickstart = _command_line(_block_with("bash launch/quickstart.sh"), "bash launch/quickstart.sh")
  assert quickstart == "bash launch/quickstart.sh"
  printed = _run(checkout, quickstart).stderr
  # The curriculum lines the README shows are what the run prints.
  shown = re.search(r"INFO curriculum \(.*?\n(stage 0 .*?)\n(stage 1 .*?)\n", README)
  assert shown, "the README shows the curriculum table"
  for line in shown.groups():
    assert line.removesuffix(", ...") in printed, line
  run = checkout / "workdir" / "quickstart"
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records]
  assert len(losses) == 500
  assert losses[-1] <= 0.7 * losses[0], (losses[0], losses[-1])
  # It learns rather than memorises: held-out loss falls for every language (steps 100 -> 500).
  evals = [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()]
  first, last = evals[0], evals[-1]
  assert (first["step"], last["step"]) == (100, 500)
  # (In nats per token and in bits per byte of text.)
  rose = {
    k: (first[k], last[k])
    for k in first
    if k.startswith(("val_loss/", "val_bpb/")) and last[k] >= first[k]
  }
  assert len(first) == 1 + 2 * 18 and not rose, rose

  # Export for transformers, checked (the command in the README's text).
  [export] = re.findall(r"`(polylm-export [^`]*--verify)`", README)
  _run(checkout, f"source .venv/bin/activate\n{export}")
  assert (checkout / "workdir" / "hf" / "config.json").is_file()

  # Instruction tuning, then a chat turn (the block as shown; docs/instruction_tuning.md shows
  # the same commands).
  sft = _block_with("sft/quickstart.gin")
  guide = (REPO / "docs" / "instruction_tuning.md").read_text(encoding="utf-8")
  assert _command_line(sft, "polylm-train") == _command_line(
    _block_with("sft/quickstart.gin", guide), "polylm-train"
  )
  chat = _run(checkout, sft, stdin="Translate to German: Good morning.\n")
  steps = sorted(int(p.name) for p in (checkout / "workdir" / "sft" / "checkpoints").iterdir())
  assert steps and steps[-1] > 0
  assert "> " in chat.stdout

  # Sampling from the workdir.
  generate = _command_line(_block_with("--prompt="), "polylm-generate")
  out = _run(checkout, f"source .venv/bin/activate\n{generate}")
  assert out.stdout.strip()
  # What a user reads: no library INFO chatter (Orbax) and no failed TPU probe.
  assert "orbax" not in out.stderr.lower() and "Unable to initialize backend" not in out.stderr
