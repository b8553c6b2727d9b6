"""The seqio registry: one pretraining Task per language and the Mixtures over them.

Importing this module registers, for each of the 18 PolyLM languages, `polylm_pt_<lang>` over the
embedded sample corpus (splits `train` / `validation`), the mixture `polylm_sample` (equal rates),
and the bilingual tasks `polylm_bitext_<src>_<tgt>` (English <-> each language) over its parallel
sentences, tagged with PolyLM's language set; a run that configures another set registers them
again with it (`register_sample_tasks(vocab, language_set)`).
Register your own corpora the same way: a seqio Task whose output feature is `targets`, tokenized
with the same vocabulary, then a Mixture naming the tasks (see README, "Your own data").
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from polylm_jax import languages
from polylm_jax.data import documents, sample

TASK_PREFIX = "polylm_pt_"
SAMPLE_MIXTURE = "polylm_sample"


@functools.lru_cache(maxsize=None)
def vocabulary(model_path: str = str(sample.TOKENIZER_MODEL)) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(model_path)


LANGUAGE_FEATURE = "lang"


def output_features(
  vocab: seqio.Vocabulary,
  *,
  language_set: languages.Languages = languages.DEFAULT,
  language_tagged: bool = True,
  blocks: bool = True,
) -> dict[str, seqio.Feature]:
  """`targets`, plus the per-token language tag `lang` (`language_set.tag`, the run's set; 0
  none) that lets the trainer report training loss per language through packing. `blocks`: elements
  are blocks of documents (rank 2, as documents.tokenize_records makes them) rather than one
  document each (rank 1, as seqio's own per-example preprocessors make them)."""
  rank = 2 if blocks else 1
  features = {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32, rank=rank)}
  if language_tagged:
    features[LANGUAGE_FEATURE] = seqio.Feature(
      vocabulary=seqio.PassThroughVocabulary(language_set.slots),
      add_eos=False,
      dtype=tf.int32,
      rank=rank,
    )
  return features


def tag_language(lang: str, language_set: languages.Languages = languages.DEFAULT):
  """Per-example preprocessor (after tokenize + EOS) for tasks you write with seqio's own
  preprocessors: every target token is tagged with `lang`'s tag in `language_set` (the run's
  set: the same one its output_features were made with)."""

  def fn(ds):
    tag = language_set.tag(lang)  # when the dataset is built: a task no run uses never asks
    return ds.map(
      lambda ex: dict(ex, **{LANGUAGE_FEATURE: tf.fill(tf.shape(ex["targets"]), tag)}),
      num_parallel_calls=tf.data.AUTOTUNE,
    )

  return fn


def text_preprocessors(
  task: str,
  lang: str,
  records: documents.RecordFilter = documents.RecordFilter(),
  *,
  language_set: languages.Languages = languages.DEFAULT,
  parallel_blocks: int = 1,
) -> list:
  """From records to blocks of documents tagged with `lang` in `language_set` ({"targets":
  tokens + EOS, "lang"})."""
  return [
    documents.tokenize_records(
      task, lang, records, language_set=language_set, parallel_blocks=parallel_blocks
    )
  ]


def _sample_dataset_fn(lang: str):
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one small file per language: example-level shuffling is seqio's
    return tf.data.Dataset.from_tensor_slices({"text": sample.sample_lines(lang, split)})

  return dataset_fn


# The language set and tokenizer each task this module registered was made with (and the task
# object, which a caller may since have replaced): a run with another set or tokenizer registers
# them again for its own.
_MADE_FOR: dict[str, tuple[seqio.Task, languages.Languages, str]] = {}


def _vocab_key(vocab: seqio.Vocabulary) -> str:
  return str(getattr(vocab, "sentencepiece_model_file", None) or id(vocab))


def _registered_for(
  name: str, language_set: languages.Languages, vocab: seqio.Vocabulary | None = None
) -> bool:
  """Whether `name` is registered, made by this module for `language_set` and `vocab`. Another
  version of it (another set's or tokenizer's, or a caller's own) is removed, to be registered
  again."""
  if name not in seqio.TaskRegistry.names():
    return False
  made = _MADE_FOR.get(name)
  wanted = (language_set, _vocab_key(vocab or vocabulary()))
  if made is not None and made[0] is seqio.TaskRegistry.get(name) and made[1:] == wanted:
    return True
  seqio.TaskRegistry.remove(name)
  return False


def _add(name: str, language_set: languages.Languages, vocab: seqio.Vocabulary, **task) -> None:
  _MADE_FOR[name] = (seqio.TaskRegistry.add(name, **task), language_set, _vocab_key(vocab))


def register_sample_tasks(
  vocab: seqio.Vocabulary | None = None, language_set: languages.Languages = languages.DEFAULT
) -> list[str]:
  """Registers `polylm_pt_<lang>` for every language of the sample and the equal-rate
  `polylm_sample` mixture, tagged with `language_set` (the run's; registered again when a run
  has another)."""
  vocab = vocab or vocabulary()
  names = []
  fresh = False
  for lang in sample.LANGUAGES:
    name = TASK_PREFIX + lang
    if not _registered_for(name, language_set, vocab):
      fresh = True
      _add(
        name,
        language_set,
        vocab,
        source=seqio.FunctionDataSource(
          _sample_dataset_fn(lang),
          splits=("train", "validation"),
          num_input_examples={
            s: len(sample.sample_lines(lang, s)) for s in ("train", "validation")
          },
        ),
        preprocessors=text_preprocessors(name, lang, language_set=language_set),
        output_features=output_features(vocab, language_set=language_set),
        shuffle_buffer_size=documents.SHUFFLE_BLOCKS,
      )
    names.append(name)
  if fresh and SAMPLE_MIXTURE in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(SAMPLE_MIXTURE)  # it holds the task objects it was made with
  if SAMPLE_MIXTURE not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(SAMPLE_MIXTURE, [(n, 1.0) for n in names])
  return names


BITEXT_PREFIX = "polylm_bitext_"
BITEXT_TEMPLATE = "{src}\n{tgt}"


def register_bitext_tasks(
  pairs=None,
  *,
  template: str = BITEXT_TEMPLATE,
  vocab: seqio.Vocabulary | None = None,
  prefix: str = BITEXT_PREFIX,
  language_set: languages.Languages = languages.DEFAULT,
) -> list[str]:
  """Bilingual documents from the sample's parallel sentences: `<prefix><src>_<tgt>`, one
  document per sentence pair, formatted by `template` ({src}, {tgt}, {src_lang}, {tgt_lang}).
  Every token is tagged with the non-English language of the pair (its tag in `language_set`).
  Default pairs: English <-> each other language."""
  vocab = vocab or vocabulary()
  pairs = pairs or [
    p for lang in sample.LANGUAGES if lang != "en" for p in (("en", lang), (lang, "en"))
  ]
  names = []
  for src, tgt in pairs:
    name = f"{prefix}{src}_{tgt}"
    names.append(name)
    if _registered_for(name, language_set, vocab):
      continue

    def dataset_fn(split, shuffle_files, seed=None, src=src, tgt=tgt):
      del shuffle_files, seed
      docs = [
        template.format(src=a, tgt=b, src_lang=src, tgt_lang=tgt)
        for a, b in zip(sample.parallel_lines(src, split), sample.parallel_lines(tgt, split))
      ]
      return tf.data.Dataset.from_tensor_slices({"text": docs})

    _add(
      name,
      language_set,
      vocab,
      source=seqio.FunctionDataSource(
        dataset_fn,
        splits=("train", "validation"),
        num_input_examples={s: len(sample.parallel_lines(src, s)) for s in ("train", "validation")},
      ),
      preprocessors=text_preprocessors(
        name, tgt if src == "en" else src, language_set=language_set
      ),
      output_features=output_features(vocab, language_set=language_set),
      shuffle_buffer_size=documents.SHUFFLE_BLOCKS,
    )
  return names


def task_language(task_name: str, language_set: languages.Languages = languages.DEFAULT) -> str:
  """The language a task's metrics are named after: its name's last part when that is one of the
  run's languages (polylm_pt_th, polylm_sft_th -> th), else the whole name."""
  last = task_name.rsplit("_", 1)[-1]
  return last if last in language_set.codes else task_name


register_sample_tasks()
register_bitext_tasks()
