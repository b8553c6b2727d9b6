"""polylm-compile: the real train step compiled for a target without running it, its memory
report, and the exit status that says whether it fits."""

import pytest

from polylm_jax.errors import ConfigError
from polylm_jax.train import compile_cli, gin_setup


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
  # XLA's count of a scanned model's FLOPs covers one layer; the model's own count is printed.
  assert "(XLA counts the scanned layer body once)" in out
  from polylm_jax.config import PRESETS
  from polylm_jax.trainer.flops import train_flops_per_token

  per_device = train_flops_per_token(PRESETS["tiny"], 128) * 8 * 128 / 8
  assert f"model FLOPs {per_device:.3e} a step" in out


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


@pytest.mark.parametrize(
  "preset", sorted(p.name for p in (gin_setup.GIN_DIR / "runs" / "fit").glob("*.gin"))
)
def test_fit_presets_configure_the_model_slice_and_batch_they_are_named_for(preset):
  """Each preset of docs/scale.md's fit table parses and holds what its row says: the model, a
  batch every chip of the slice gets rows of, FSDP over all chips, the tiled loss."""
  from polylm_jax import tpu_slices

  gin_setup.register_configurables()
  gin_setup.parse_gin(
    [f"runs/fit/{preset}"],
    ["TrainerConfig.num_steps = 1000", "DataConfig.mixture = 'polylm_sample'"],
  )
  model = gin_setup.configured("train.model")
  data = gin_setup.configured("train.data")
  mesh = gin_setup.configured("train.mesh")
  trainer = gin_setup.configured("train.trainer")
  name, slice_ = preset.removesuffix(".gin").split("_v")
  assert model.name == name.replace("_7b", ".7b") and model.attention_impl == "pallas_tpu"
  chips = tpu_slices.chips("v" + slice_.replace("_", "-"))
  assert data.seq_len == 2048 and data.batch_size % chips == 0
  assert mesh.resolve(chips) == (1, chips, 1) and trainer.loss.impl == "tiled"


def test_fit_presets_need_no_step_count_or_mixture_and_advice_leaves_out_what_they_have(caplog):
  """A fit check reads no data and its memory does not depend on the schedule's length: the
  presets compile as docs/scale.md shows them, without inventing either."""
  import logging

  from polylm_jax.trainer import memory_report

  gin_setup.register_configurables()
  with caplog.at_level(logging.INFO):
    compile_cli._parse(["runs/fit/polylm_13b_v5p_8.gin"], [])
  assert "TrainerConfig.num_steps is not set; a fit check does not depend on it" in caplog.text
  model, trainer = gin_setup.configured("train.model"), gin_setup.configured("train.trainer")
  advice = memory_report.knobs(
    model, trainer.loss, gin_setup.configured("train.optimizer"), gin_setup.configured("train.mesh")
  )
  assert "DataConfig.batch_size" in advice and "token_tile" in advice
  assert "remat_policy" not in advice and "LossConfig.impl" not in advice and "fsdp" not in advice
  # What must be chosen for training is still REQUIRED for it: only the fit check fills it in.
  with pytest.raises(ConfigError, match="TrainerConfig.num_steps set to `%gin.REQUIRED`"):
    gin_setup.parse_gin(["runs/fit/polylm_13b_v5p_8.gin"], [])


def test_a_step_count_the_schedule_cannot_take_is_a_configuration_error():
  with pytest.raises(SystemExit, match="must exceed warmup_steps"):
    compile_cli.main(["--gin_file=quickstart.gin", "--gin_bindings=TrainerConfig.num_steps = 2"])


@pytest.mark.slow
def test_the_documented_fit_check_runs_as_written(capsys):
  code = compile_cli.main(["--gin_file=runs/fit/polylm_13b_v5p_8.gin", "--target=v5p-8"])
  assert code == 0 and "fits (" in capsys.readouterr().out
