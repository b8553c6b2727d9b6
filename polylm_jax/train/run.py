"""The training entry point gin calls (`train`): wires the run's language set, corpora, the seqio
pipeline, held-out sets and benchmarks to the training engine (polylm_jax.trainer), handing
evaluation over as callbacks. Settings that need nothing built are checked before anything is.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import gin

from polylm_jax import languages as language_sets
from polylm_jax.checkpoint.manager import CheckpointConfig, checkpoint_steps, tokenizer_b64
from polylm_jax.errors import ConfigError
from polylm_jax.io import storage
from polylm_jax.trainer import callbacks as callbacks_lib
from polylm_jax.trainer import loop
from polylm_jax.trainer.spikes import SpikeConfig


def run(
  workdir: str,
  model=gin.REQUIRED,
  optimizer=gin.REQUIRED,
  mesh=gin.REQUIRED,
  data=gin.REQUIRED,
  trainer=gin.REQUIRED,
  checkpoint=CheckpointConfig(),
  spikes=SpikeConfig(),
  curriculum=None,
  corpora=None,
  bitext=None,
  start_over=False,
  languages=None,
  instructions=None,
  epochs=None,
  tokenizer=None,
):
  """The gin entry point: wires the seqio pipeline to the training loop. `tokenizer`: the
  SentencePiece model every task tokenizes with (a path or gs://...; None: the sample's)."""
  language_set = languages or language_sets.DEFAULT  # handed to everything that tags or names
  _check_settings(model, optimizer, data, trainer, epochs)
  if tokenizer is not None and not storage.exists(str(tokenizer)):
    raise ConfigError(f"train.tokenizer = {tokenizer!r}: no such file")
  from polylm_jax.data import tasks

  vocab = tasks.vocabulary(str(tokenizer)) if tokenizer is not None else tasks.vocabulary()
  # Registered again if another language set or tokenizer had them.
  tasks.register_sample_tasks(vocab, language_set=language_set)
  tasks.register_bitext_tasks(vocab=vocab, language_set=language_set)
  for registry in (corpora, bitext):  # TextCorpora, BitextCorpora: before anything names a task
    if registry is not None:
      registry.register(vocab, language_set=language_set)
  metadata: dict[str, Any] = {}
  if instructions is not None:  # instruction tuning (data/instructions.py)
    stats = instructions.register(vocab, data.seq_len, language_set)
    metadata["instruction_format"] = instructions.format.to_meta()
    if epochs is not None:
      trainer = _steps_for_epochs(trainer, optimizer, stats, epochs, data.batch_size)
  elif epochs is not None:
    raise ConfigError(
      "train.epochs needs instruction data (train.instructions); for "
      "pre-training set TrainerConfig.num_steps"
    )
  done = checkpoint_steps(workdir) if checkpoint.enabled and not start_over else []
  if done and done[-1] >= trainer.num_steps:
    logging.info(
      "%s is complete: its checkpoint of step %d reaches TrainerConfig.num_steps=%d, so there is "
      "nothing to train. To train further, raise TrainerConfig.num_steps; to begin a new run, "
      "give another --workdir, or pass --start_over (this run's files move to previous/).",
      workdir,
      done[-1],
      trainer.num_steps,
    )
    return {"metrics": {}, "state": None, "train_step": None, "complete_at": done[-1]}
  if vocab.vocab_size > model.vocab_size:
    raise ConfigError(
      f"the tokenizer has {vocab.vocab_size} ids but ModelConfig.vocab_size="
      f"{model.vocab_size} ({model.name}); enlarge the model vocabulary (train.tokenizer: "
      f"{vocab.sentencepiece_model_file})"
    )
  if curriculum is not None:
    curriculum = dataclasses.replace(curriculum, language_set=language_set)
  batches, names = _batches(data, curriculum)
  metadata.update(_data_metadata(data, curriculum, vocab))
  result = loop.train(
    model,
    optimizer,
    mesh,
    trainer,
    batches,
    workdir,
    checkpoint=checkpoint,
    spikes=spikes,
    metadata=metadata,
    start_over=start_over,
    language_set=language_set,
    callbacks=callbacks_lib.default_callbacks(spikes)
    + _evaluations(trainer, data, names, vocab, language_set),
  )
  from polylm_jax.data import sources

  for task, counts in sources.dropped_records().items():
    logging.warning("data: task %s dropped records %s", task, counts)
  return result


def _check_settings(model, optimizer, data, trainer, epochs) -> None:
  """What can be checked before anything is registered or built."""
  if data.seq_len > model.max_length:
    raise ConfigError(
      f"DataConfig.seq_len={data.seq_len} exceeds the model's max_length={model.max_length}"
    )
  if epochs is not None and trainer.num_steps is not None:
    raise ConfigError(
      f"both train.epochs = {epochs} and TrainerConfig.num_steps = {trainer.num_steps} are set; "
      f"set one: train.epochs = None to train a number of steps, or TrainerConfig.num_steps = "
      f"None to train a number of epochs"
    )
  if epochs is None:
    if trainer.num_steps is None:
      raise ConfigError(
        "TrainerConfig.num_steps is None: set the number of steps to train (or train.epochs "
        "for instruction data)"
      )
    _check_schedule(optimizer, trainer.num_steps)


def _steps_for_epochs(trainer, optimizer, stats, epochs, batch_size):
  from polylm_jax.data.instructions import steps_for_epochs

  steps = steps_for_epochs(stats, epochs, batch_size)
  logging.info("train.epochs = %s: %d steps of %d rows", epochs, steps, batch_size)
  _check_schedule(optimizer, steps)
  return dataclasses.replace(trainer, num_steps=steps)


def _batches(data, curriculum):
  """The resumable training batches (a curriculum's stages, or one mixture) and the mixtures
  that feed them."""
  import jax

  from polylm_jax.data import pipeline, resumable

  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if curriculum is not None:
    logging.info(
      "curriculum (DataConfig.mixture=%r is not used):\n%s",
      data.mixture,
      curriculum.table(data.split),
    )
    staged = resumable.StagedBatches(curriculum, data, **where)
    batches: resumable.StagedBatches | resumable.BatchIterator = staged
    names = staged.mixtures
  else:
    batches = resumable.BatchIterator(data, **where)
    names = [data.mixture]
  pipeline.check_has_data(names, data)
  return batches, names


def _data_metadata(data, curriculum, vocab) -> dict[str, Any]:
  """What a checkpoint records of the data: compared on resume, shown in the export's card."""
  from polylm_jax.data import pipeline

  metadata = {
    "gin_config": gin.config_str(),
    "tokenizer_model_b64": tokenizer_b64(vocab.sentencepiece_model_file),
    "data_config": dataclasses.asdict(data),
  }
  if curriculum is not None:  # what fed the run, for the export's model card
    metadata["curriculum"] = curriculum.table(data.split)
  else:  # compared on resume: the data state continues only this mixture's pipeline
    metadata["mixture_rates"] = ", ".join(
      f"{t.name} {r:.6g}" for t, r in pipeline.mixture_tasks(data.mixture)
    )
  return metadata


def _evaluations(trainer, data, names, vocab, language_set) -> list[callbacks_lib.Callback]:
  """Held-out loss per language (the validation split of every task the run trains on) and
  lm-eval benchmarks, each every N steps: callbacks of the loop."""
  import jax
  import seqio

  from polylm_jax.data import pipeline, tasks

  evaluations: list[tuple[int, callbacks_lib.EvalFn]] = []
  if trainer.eval_every:
    task_names = sorted({t.name for n in names for t, _ in pipeline.mixture_tasks(n)})
    eval_sets = pipeline.HeldOutSets(
      {
        tasks.task_language(t, language_set): dataclasses.replace(
          data, mixture=t, split="validation"
        )
        for t in task_names
        if "validation" in seqio.get_mixture_or_task(t).splits
      },
      shard_index=jax.process_index(),
      num_shards=jax.process_count(),
      agree=_most_over_processes if jax.process_count() > 1 else None,
    )
    evaluations.append(
      (trainer.eval_every, callbacks_lib.held_out_loss(eval_sets, _token_bytes(vocab)))
    )
  if trainer.lm_eval_tasks:
    from polylm_jax.eval.in_training import Benchmark

    benchmark = Benchmark(
      trainer.lm_eval_tasks,
      storage.read_bytes(vocab.sentencepiece_model_file),
      limit=trainer.lm_eval_limit,
      num_fewshot=trainer.lm_eval_num_fewshot,
      include_path=trainer.lm_eval_include_path,
      languages=language_set.codes,
    )
    evaluations.append((trainer.lm_eval_every, benchmark))
  out: list[callbacks_lib.Callback] = [callbacks_lib.Evaluations(evaluations)]
  if trainer.profile_start_step:
    out.append(callbacks_lib.Profile(trainer.profile_start_step, trainer.profile_num_steps))
  return out


def _most_over_processes(counts: list[int]) -> list[int]:
  """Each count's largest value over all processes (an allgather; every process calls it)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int32)))
  return [int(c) for c in gathered.reshape(jax.process_count(), -1).max(axis=0)]


def _check_schedule(optimizer, num_steps: int) -> None:
  from polylm_jax.optimizer import lr_schedule

  try:
    lr_schedule(optimizer, num_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _token_bytes(vocab):
  """The bytes of each token id, for val_bpb; logged when they are not the text's own."""
  import sentencepiece as spm

  from polylm_jax.data import tokenizer

  sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(vocab.sentencepiece_model_file))
  table = tokenizer.token_bytes(sp)
  if not tokenizer.bytes_exact(sp, table):
    logging.warning(
      "val_bpb counts the bytes of the text as the tokenizer %s normalizes it (it does not "
      "give every text back byte for byte: a dummy prefix, folded whitespace or a "
      "normalization rule), not the raw text's bytes",
      vocab.sentencepiece_model_file,
    )
  return table
