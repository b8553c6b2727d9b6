"""polylm-compile: the real train step compiled for a target without running it, its memory
report, and the exit status that says whether it fits."""

import pytest

from polylm_jax.train import compile_cli


@pytest.mark.slow
def test_quickstart_compiles_for_a_v5p_slice_and_reports_what_it_needs(capsys):
  code = compile_cli.main(["--gin_file=quickstart.gin", "--target=v5p-8"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "v5p-8 (v5p:2x2x1: 4 x TPU v5, ahead of time)" in out
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in out
  for line in ("arguments (train state + batch)", "temporaries", "compiled FLOPs"):
    assert line in out
  assert "of 95.0 GiB" in out and "fits" in out


def test_a_step_that_does_not_fit_exits_1_with_the_settings_to_change(capsys):
  code = compile_cli.main(
    [
      "--gin_file=quickstart.gin",
      "--target=local",
      "--hbm_gib=0.001",
      "--gin_bindings=DataConfig.batch_size = 8",
    ]
  )
  out = capsys.readouterr().out
  assert code == 1
  assert "DOES NOT FIT" in out and "LossConfig.impl = 'tiled'" in out and "remat_policy" in out


def test_a_step_the_tpu_compiler_refuses_for_memory_does_not_fit(capsys):
  """libtpu's compiler stops at a program larger than the chip's HBM: that is a 'does not fit'
  with the figures it gives, not a crash."""
  code = compile_cli.main(
    ["--gin_file=quickstart.gin", "--target=v5e-4", "--gin_bindings=DataConfig.batch_size = 65536"]
  )
  out = capsys.readouterr().out
  assert code == 1, out
  assert "DOES NOT FIT: the compiler for v5e-4" in out and "exceeds available HBM" in out
  assert "remat_policy" in out


def test_unknown_targets_are_named():
  with pytest.raises(SystemExit, match="--target=v5p-9: not a known TPU slice"):
    compile_cli.main(["--gin_file=quickstart.gin", "--target=v5p-9"])
  assert compile_cli.topology_name("v5e-256") == "v5e:16x16"
  assert compile_cli.topology_name("v5p-64") == "v5p:4x4x2"
