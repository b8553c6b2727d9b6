"""A run and an export written by an earlier version (fixtures/made_before_the_redesign: a tiny
model trained 4 steps on the embedded English sample, checkpoints at steps 2 and 4, step 4 kept,
and its Hugging Face export) still resume, export and generate the same."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from runs import train_args

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "made_before_the_redesign"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _copy(what: str, tmp_path) -> pathlib.Path:
  dst = tmp_path / what
  shutil.copytree(FIXTURE / what, dst)
  return dst


@pytest.mark.slow
def test_an_earlier_checkpoint_resumes_with_the_same_losses(tmp_path):
  """The continuation from the earlier checkpoint (parameters, optimizer state, data position)
  gives the losses the earlier version gave for steps 5 and 6."""
  from polylm_jax.train import train_cli as cli

  workdir = _copy("run", tmp_path)
  cli.main(train_args(workdir, EXPECTED["train_bindings"]))
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  resumed = {str(r["step"]): r["loss"] for r in rows if r["step"] > 4}
  assert resumed.keys() == EXPECTED["resumed_losses"].keys()
  for step, loss in EXPECTED["resumed_losses"].items():
    assert resumed[step] == pytest.approx(loss, rel=1e-6), step


def test_an_earlier_checkpoint_exports_to_the_earlier_export(tmp_path):
  from safetensors.numpy import load_file

  from polylm_jax.export import export_cli as cli

  out = tmp_path / "export"
  assert cli.main([f"--workdir={_copy('run', tmp_path)}", f"--out={out}"]) == 0
  now, before = (
    load_file(out / "model.safetensors"),
    load_file(FIXTURE / "export/model.safetensors"),
  )
  assert now.keys() == before.keys()
  for name, tensor in before.items():
    np.testing.assert_array_equal(now[name], tensor, err_msg=name)
  assert json.loads((out / "config.json").read_text()) == json.loads(
    (FIXTURE / "export/config.json").read_text()
  )


@pytest.mark.parametrize("source", ["run", "export"])
def test_an_earlier_checkpoint_and_export_generate_the_same(source, tmp_path, capsys):
  from polylm_jax.decode import generate_cli as cli

  flag = "--workdir" if source == "run" else "--hf_dir"
  cli.main(
    [
      f"{flag}={_copy(source, tmp_path)}",
      f"--prompt={EXPECTED['greedy_prompt']}",
      f"--max_new_tokens={EXPECTED['greedy_max_new_tokens']}",
    ]
  )
  assert capsys.readouterr().out.strip() == EXPECTED["greedy_completion"]
