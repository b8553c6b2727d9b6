"""lm-eval hooks of the shipped translation tasks (polylm_jax/eval/translation.py holds the rest):
the data read from local files, the prompt, and sacreBLEU's corpus BLEU and chrF++."""

import datasets

from polylm_jax.eval import translation


def _dataset(splits: dict) -> datasets.DatasetDict:
  return datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})


def wmt20(direction: str, **unused) -> datasets.DatasetDict:
  return _dataset(translation.read_wmt20(direction))


def flores(direction: str, **unused) -> datasets.DatasetDict:
  return _dataset(translation.read_flores(direction))


def doc_to_text(doc) -> str:
  return translation.prompt(doc["source_code"], doc["target_code"], doc["source"])


def process_results(doc, results):
  # Each metric's item: (reference, hypothesis, target language), scored per corpus below.
  item = (doc["target"], results[0].strip(), doc["target_code"])
  return {"bleu": item, "chrf": item}


def bleu(items) -> float:
  references, hypotheses, targets = zip(*items)
  return translation.bleu(list(hypotheses), list(references), targets[0])


def chrf(items) -> float:
  references, hypotheses, _ = zip(*items)
  return translation.chrf(list(hypotheses), list(references))
