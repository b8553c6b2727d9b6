"""The seqio registry: one pretraining Task per language and the Mixtures over them.

Importing this module registers, for each of the 18 PolyLM languages, `polylm_pt_<lang>` over the
embedded sample corpus (splits `train` / `validation`) and the mixture `polylm_sample` (equal rates).
Register your own corpora the same way: a seqio Task whose output feature is `targets`, tokenized
with the same vocabulary, then a Mixture naming the tasks (see README, "Your own data").
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from polylm_jax.data import sample

TASK_PREFIX = "polylm_pt_"
SAMPLE_MIXTURE = "polylm_sample"


@functools.lru_cache(maxsize=None)
def vocabulary(model_path: str = str(sample.TOKENIZER_MODEL)) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(model_path)


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}


def _sample_dataset_fn(lang: str):
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one small file per language: example-level shuffling is seqio's
    return tf.data.Dataset.from_tensor_slices({"text": sample.sample_lines(lang, split)})
  return dataset_fn


def register_sample_tasks(vocab: seqio.Vocabulary | None = None) -> list[str]:
  """Registers `polylm_pt_<lang>` for every language and the equal-rate `polylm_sample` mixture."""
  vocab = vocab or vocabulary()
  names = []
  for lang in sample.LANGUAGES:
    name = TASK_PREFIX + lang
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(
          name,
          source=seqio.FunctionDataSource(
              _sample_dataset_fn(lang), splits=("train", "validation"),
              num_input_examples={s: len(sample.sample_lines(lang, s))
                                  for s in ("train", "validation")}),
          preprocessors=[
              functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
              seqio.preprocessors.tokenize,
              seqio.preprocessors.append_eos_after_trim,
          ],
          output_features=output_features(vocab))
    names.append(name)
  if SAMPLE_MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(SAMPLE_MIXTURE, [(n, 1.0) for n in names])
  return names


def task_language(task_name: str) -> str:
  return task_name[len(TASK_PREFIX):] if task_name.startswith(TASK_PREFIX) else task_name


register_sample_tasks()
