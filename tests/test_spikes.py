"""Loss spikes: a corrupt batch is detected from running statistics and handled as configured."""

import json
import logging

import numpy as np
import pytest

from polylm_jax import sharding
from polylm_jax.checkpoint.manager import CheckpointConfig
from polylm_jax.config import PRESETS
from polylm_jax.data import pipeline, resumable, tasks  # noqa: F401 (registers the sample tasks)
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.trainer.loop import TrainerConfig, train
from polylm_jax.trainer.spikes import SpikeConfig

CORRUPT_AT = 26  # the 26th batch is corrupt


class CorruptingBatches(resumable.BatchIterator):
  """The sample pipeline, with every target of one batch replaced by <unk> (id 0), which never
  occurs in the data: the model has learnt to give it almost no probability, so the loss jumps."""

  def __next__(self):
    batch = super().__next__()
    if self.position == CORRUPT_AT:
      batch["targets"][:] = 0
    return batch


def _run(tmp_path, mode, steps=34):
  # One language (one pipeline to build): the spike is what matters, not the mixture.
  data = pipeline.DataConfig(mixture="polylm_pt_en", seq_len=64, batch_size=8, seed=0)
  batches = CorruptingBatches(data)
  result = train(
    PRESETS["tiny"],
    OptimizerConfig(peak_lr=3e-3, warmup_steps=3, decay_steps=200),
    sharding.MeshConfig(data=-1),
    TrainerConfig(num_steps=steps, tensorboard=False),
    batches,
    str(tmp_path),
    checkpoint=CheckpointConfig(every_steps=5, async_save=True),
    spikes=SpikeConfig(mode=mode, warmup_steps=10, z_threshold=4.0, rollback_skip_batches=3),
  )
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  return result, records, batches


@pytest.mark.parametrize("mode", ["log", "skip"])
def test_spike_is_detected_and_logged_or_skipped(tmp_path, caplog, mode):
  with caplog.at_level(logging.WARNING):
    result, records, _ = _run(tmp_path, mode)
  spikes = [r for r in records if r["spike"]]
  assert [r["step"] for r in spikes] == [CORRUPT_AT]
  r = spikes[0]
  assert r["loss"] > r["loss_threshold"] or r["grad_norm"] > r["grad_norm_threshold"]
  assert f"step {CORRUPT_AT}: loss spike: loss" in caplog.text
  assert r["skipped"] == (1 if mode == "skip" else 0)
  assert sum(x["skipped"] for x in records) == r["skipped"]


def test_rollback_restores_the_checkpoint_and_skips_batches(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    result, records, batches = _run(tmp_path, "rollback")
  # The last checkpoint before the spike is step 25; the data resumes 3 batches past the spike.
  assert (
    f"loss spike at step {CORRUPT_AT}: rolled back to step 25 and skipped 4 batches "
    f"(data resumes at position {CORRUPT_AT + 3})"
  ) in caplog.text
  assert int(result["state"].step) == 34
  assert batches.position == CORRUPT_AT + 3 + (34 - 25)
  steps = [r["step"] for r in records]
  assert steps.count(CORRUPT_AT) == 2  # once spiking, once again after the rollback
  assert [r["spike"] for r in records if r["step"] == CORRUPT_AT] == [1, 0]


def test_detector_statistics_and_grad_norm_option():
  import jax.numpy as jnp

  from polylm_jax.trainer import spikes

  cfg = SpikeConfig(warmup_steps=5, z_threshold=4.0)
  with_grad = SpikeConfig(warmup_steps=5, z_threshold=4.0, grad_norm_z_threshold=4.0)
  stats_a = stats_b = spikes.initial_stats()
  rng = np.random.default_rng(0)
  for _ in range(30):
    loss, gn = 3.0 + 0.05 * rng.normal(), 1.0 + 0.05 * rng.normal()
    spike_a, stats_a, _ = spikes.detect(stats_a, jnp.float32(loss), jnp.float32(gn), True, cfg)
    spike_b, stats_b, _ = spikes.detect(
      stats_b, jnp.float32(loss), jnp.float32(gn), True, with_grad
    )
    assert not spike_a and not spike_b
  assert float(stats_a[0]) == 30
  np.testing.assert_allclose(float(stats_a[1] / (1 - 0.99**30)), 3.0, atol=0.05)
  big_grad = (jnp.float32(3.0), jnp.float32(10.0), True)
  assert not spikes.detect(stats_a, *big_grad, cfg)[0]
  assert spikes.detect(stats_b, *big_grad, with_grad)[0]
  spike, after, _ = spikes.detect(stats_a, jnp.float32(9.0), jnp.float32(1.0), True, cfg)
  assert spike and float(after[0]) == 30  # a spike does not feed the statistics
  assert not spikes.detect(stats_a, jnp.float32(jnp.nan), jnp.float32(1.0), False, cfg)[0]
  with pytest.raises(ValueError, match="SpikeConfig.mode='sometimes'"):
    SpikeConfig(mode="sometimes")
