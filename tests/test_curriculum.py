"""Staged curricula: rate resolution and its errors, stage switching, exact resume across stage
boundaries, and per-host data shards."""

import dataclasses
import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from polylm_jax.data import packing, pipeline, resumable, sample, tasks, tokenizer
from polylm_jax.data.curriculum import Curriculum, Stage, resolve_rates

SP = tokenizer.load(sample.TOKENIZER_MODEL)
CFG = pipeline.DataConfig(seq_len=64, batch_size=4, seed=3)


def test_rates_explicit_plus_temperature():
  rates = resolve_rates(Stage(rates={"en": 0.7}, temperature=0.3))
  assert rates[tasks.TASK_PREFIX + "en"] == pytest.approx(0.7)
  others = [v for k, v in rates.items() if not k.endswith("_en")]
  assert len(others) == 17 and sum(others) == pytest.approx(0.3)
  # Temperature sampling from counts: p ~ n^alpha, so alpha < 1 flattens the distribution.
  counts = {"de": 1000.0, "th": 10.0}
  flat = resolve_rates(Stage(temperature=0.3, tasks=("de", "th"), counts=counts))
  sharp = resolve_rates(Stage(temperature=1.0, tasks=("de", "th"), counts=counts))
  assert sharp["polylm_pt_de"] == pytest.approx(1000 / 1010)
  assert flat["polylm_pt_th"] == pytest.approx(10**0.3 / (10**0.3 + 1000**0.3))
  assert flat["polylm_pt_th"] > sharp["polylm_pt_th"]


def test_bad_rates_fail_naming_the_problem():
  with pytest.raises(ValueError, match="rate of 'polylm_pt_de' is negative"):
    resolve_rates(Stage(rates={"de": -1.0, "en": 1.0}))
  with pytest.raises(ValueError, match="all rates are zero"):
    resolve_rates(Stage(rates={"de": 0.0}))
  with pytest.raises(ValueError, match="'xx' is neither a registered task nor a language"):
    resolve_rates(Stage(rates={"xx": 1.0}))
  with pytest.raises(ValueError, match="start at step 0 and have increasing"):
    Curriculum(stages=(Stage(start_step=0), Stage(start_step=0)))


def test_a_language_with_a_rate_but_no_data_fails_at_start():
  name = "polylm_test_empty"
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
        lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({"text": [""]}).take(0),
        splits=("train",),
      ),
      preprocessors=[
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        seqio.preprocessors.tokenize,
        tasks.tag_language("en"),
      ],
      output_features=tasks.output_features(tasks.vocabulary(), blocks=False),
    )
  mixtures = Curriculum(stages=(Stage(rates={"en": 0.5, name: 0.5}),)).mixtures()
  with pytest.raises(ValueError, match="task 'polylm_test_empty' yields no train documents"):
    pipeline.check_has_data(mixtures, pipeline.DataConfig())


def _languages(batch):
  """The languages of the tokens of a batch (from their language tags)."""
  return {sample.LANGUAGES[t - 1] for t in np.unique(batch["languages"][batch["weights"] > 0])}


TWO_STAGES = Curriculum(
  stages=(
    Stage(start_step=0, rates={"th": 1.0}, name="thai"),
    Stage(start_step=3, rates={"ko": 1.0}, name="korean"),
  )
)


def test_batches_switch_stage_at_the_boundary():
  batches = resumable.StagedBatches(TWO_STAGES, CFG)
  seen = [_languages(next(batches)) for _ in range(5)]
  assert seen[:3] == [{"th"}] * 3 and seen[3:] == [{"ko"}] * 2
  assert batches.stage == 1 and batches.position == 5


def _fingerprint(batch):
  return hash(batch["targets"].tobytes() + batch["segment_ids"].tobytes())


def test_next_stage_prepared_ahead_yields_the_same_batches():
  eager = resumable.StagedBatches(dataclasses.replace(TWO_STAGES, prepare_ahead_steps=2), CFG)
  lazy = resumable.StagedBatches(dataclasses.replace(TWO_STAGES, prepare_ahead_steps=0), CFG)
  first = [_fingerprint(next(eager)) for _ in range(2)]
  assert 1 in eager._ahead  # stage 1 is being built in the background before its boundary
  expected = [_fingerprint(next(lazy)) for _ in range(6)]
  assert first + [_fingerprint(next(eager)) for _ in range(4)] == expected
  assert not eager._ahead  # nothing built ahead is left behind


def test_a_failed_background_build_fails_the_switch(monkeypatch):
  batches = resumable.StagedBatches(dataclasses.replace(TWO_STAGES, prepare_ahead_steps=2), CFG)
  build = batches._stage_iterator

  def broken(stage):
    if stage == 1:
      raise OSError("disk gone")
    return build(stage)

  monkeypatch.setattr(batches, "_stage_iterator", broken)
  for _ in range(3):
    next(batches)
  with pytest.raises(RuntimeError, match="stage 1's input pipeline failed"):
    next(batches)


@pytest.mark.parametrize("restart_at", [2, 3, 4])  # before, at and after the stage boundary
def test_resume_gives_the_uninterrupted_batches(tmp_path, restart_at):
  reference = resumable.StagedBatches(TWO_STAGES, CFG)
  expected = [_fingerprint(next(reference)) for _ in range(6)]
  first = resumable.StagedBatches(TWO_STAGES, CFG)
  for _ in range(restart_at):
    next(first)
  first.save(str(tmp_path))
  resumed = resumable.StagedBatches(TWO_STAGES, CFG)
  resumed.restore(str(tmp_path), restart_at)
  assert [_fingerprint(next(resumed)) for _ in range(6 - restart_at)] == expected[restart_at:]


def test_host_shards_are_disjoint_and_cover_the_data():
  config = pipeline.DataConfig(mixture="polylm_pt_de", seq_len=64, batch_size=4, shuffle=False)

  def documents(index, shards):
    rows = pipeline.batches(config, shard_index=index, num_shards=shards, num_epochs=1)
    return [SP.decode(d) for d in packing.whole_documents(rows)]

  whole, a, b = documents(0, 1), documents(0, 2), documents(1, 2)
  assert not set(a) & set(b)
  assert len(a) + len(b) == len(set(a) | set(b))
  # drop_remainder may leave out the last partial batch of each shard, nothing else.
  assert set(a) | set(b) <= set(sample.sample_lines("de", "train"))
  assert len(set(a) | set(b)) >= len(set(whole)) - 2 * 4 * 3


def test_bitext_tasks_pair_parallel_sentences_with_a_configurable_format():
  names = tasks.register_bitext_tasks(
    [("de", "ja")], template="<{src_lang}> {src} <{tgt_lang}> {tgt}", prefix="polylm_test_bitext_"
  )
  assert names == ["polylm_test_bitext_de_ja"]
  assert "polylm_bitext_en_th" in seqio.TaskRegistry.names()
  assert "polylm_bitext_th_en" in seqio.TaskRegistry.names()
  ds = seqio.get_mixture_or_task(names[0]).get_dataset(
    sequence_length={"targets": 256, "lang": 256}, split="train", shuffle=False
  )
  first = next(iter(ds))  # a block of documents
  de, ja = sample.sample_lines("de", "train")[0], sample.sample_lines("ja", "train")[0]
  assert SP.decode(first["targets"][0].numpy()[:-1].tolist()) == f"<de> {de} <ja> {ja}"
  assert set(first["lang"].flat_values.numpy().tolist()) == {sample.LANGUAGES.index("de") + 1}
  # Bilingual data mixes into a curriculum stage like any task.
  rates = resolve_rates(Stage(rates={"en": 0.5, "polylm_bitext_en_th": 0.5}))
  assert rates == {"polylm_pt_en": 0.5, "polylm_bitext_en_th": 0.5}
