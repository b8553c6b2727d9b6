"""Translation benchmarks as lm-eval tasks shipped in the package: WMT20 news test and FLORES-200.

PolyLM reports WMT20 (BLEU, both directions of the pairs among its languages); FLORES-200 devtest
covers every language of a run against English. Each direction is one lm-eval task (YAMLs under
`eval/tasks/translation/`, written by `write_task_yamls`; `utils.py` there reads the data and
scores), named `wmt20_<src>-<tgt>` and `flores_<src>-<tgt>` with ISO 639-1 codes.

The data is read from local files, never downloaded at run time. Under the data directory
(`polylm-eval --data_dir`, else $HF_HOME, else ~/.cache/huggingface):

  flores200_dataset/{dev,devtest}/<flores code>.{dev,devtest}   the FLORES-200 release's layout
  sacrebleu/wmt20/wmt20.<src>-<tgt>.{src,ref}                    sacreBLEU's own cache layout

`polylm-eval fetch --tasks=flores,wmt20 --data_dir=DIR` fills both on a machine with network.
Without --data_dir, $SACREBLEU (when set) is where the WMT20 files are read.

Prompt (zero- and few-shot; a few-shot example is the same lines with its reference):

  Translate the following text from German to English.
  German: <source>
  English:

and the answer is the rest of that line. Scores are sacreBLEU's corpus BLEU (tokenizer `zh` into
Chinese, `ja-mecab` into Japanese, `13a` otherwise: WMT's standard) and chrF++ (word order 2).
"""

from __future__ import annotations

import os
import pathlib

from polylm_jax import languages as languages_lib
from polylm_jax.errors import DataError, MissingDataError

# ISO 639-1 -> FLORES-200 code, for every language the language table knows.
FLORES_CODES: dict[str, str] = {
  "en": "eng_Latn",
  "zh": "zho_Hans",
  "ru": "rus_Cyrl",
  "es": "spa_Latn",
  "de": "deu_Latn",
  "fr": "fra_Latn",
  "ar": "arb_Arab",
  "pt": "por_Latn",
  "it": "ita_Latn",
  "ja": "jpn_Jpan",
  "ko": "kor_Hang",
  "th": "tha_Thai",
  "id": "ind_Latn",
  "vi": "vie_Latn",
  "nl": "nld_Latn",
  "pl": "pol_Latn",
  "tr": "tur_Latn",
  "he": "heb_Hebr",
  "hi": "hin_Deva",
  "bn": "ben_Beng",
  "ur": "urd_Arab",
  "fa": "pes_Arab",
  "sw": "swh_Latn",
  "uk": "ukr_Cyrl",
  "cs": "ces_Latn",
  "ro": "ron_Latn",
  "hu": "hun_Latn",
  "el": "ell_Grek",
  "bg": "bul_Cyrl",
  "sv": "swe_Latn",
  "da": "dan_Latn",
  "fi": "fin_Latn",
  "no": "nob_Latn",
  "ms": "zsm_Latn",
  "tl": "tgl_Latn",
  "ta": "tam_Taml",
  "te": "tel_Telu",
  "my": "mya_Mymr",
  "km": "khm_Khmr",
  "lo": "lao_Laoo",
  "kk": "kaz_Cyrl",
  "uz": "uzn_Latn",
  "ka": "kat_Geor",
  "hy": "hye_Armn",
  "et": "est_Latn",
  "lt": "lit_Latn",
  "lv": "lvs_Latn",
  "sk": "slk_Latn",
  "sl": "slv_Latn",
  "hr": "hrv_Latn",
  "sr": "srp_Cyrl",
  "ca": "cat_Latn",
  "eu": "eus_Latn",
  "am": "amh_Ethi",
  "ne": "npi_Deva",
  "mr": "mar_Deva",
  "ml": "mal_Mlym",
}
FLORES_URL = "https://dl.fbaipublicfiles.com/nllb/flores200_dataset.tar.gz"
# WMT20's news test directions (sacreBLEU's `wmt20` test set) whose two languages the table knows.
WMT20_PAIRS = (
  "cs-en",
  "de-en",
  "de-fr",
  "en-cs",
  "en-de",
  "en-ja",
  "en-km",
  "en-pl",
  "en-ru",
  "en-ta",
  "en-zh",
  "fr-de",
  "ja-en",
  "km-en",
  "pl-en",
  "ru-en",
  "ta-en",
  "zh-en",
)
# sacreBLEU tokenizer by target language (WMT's standard; chrF++ needs none).
BLEU_TOKENIZE = {"zh": "zh", "ja": "ja-mecab"}
HEADLINE = {"wmt20": "bleu", "flores": "chrf"}


def flores_directions() -> list[str]:
  return [f"{d}-en" for d in FLORES_CODES if d != "en"] + [
    f"en-{d}" for d in FLORES_CODES if d != "en"
  ]


def task_name(benchmark: str, direction: str) -> str:
  return f"{benchmark}_{direction}"


def families() -> dict[str, dict[str, str]]:
  """{benchmark: {direction: task}} for the suite."""
  return {
    "wmt20": {d: task_name("wmt20", d) for d in WMT20_PAIRS},
    "flores": {d: task_name("flores", d) for d in flores_directions()},
  }


def data_root() -> pathlib.Path:
  """Where fetched evaluation data lives: $HF_HOME (polylm-eval --data_dir sets it), else the
  Hugging Face default."""
  return pathlib.Path(
    os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
  )


def sacrebleu_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SACREBLEU") or data_root() / "sacrebleu")


def flores_file(code: str, split: str) -> pathlib.Path:
  return data_root() / "flores200_dataset" / split / f"{FLORES_CODES[code]}.{split}"


def wmt20_files(direction: str) -> tuple[pathlib.Path, pathlib.Path]:
  base = sacrebleu_dir() / "wmt20" / f"wmt20.{direction}"
  return base.with_name(base.name + ".src"), base.with_name(base.name + ".ref")


def _lines(path: pathlib.Path, task: str, fetch: str) -> list[str]:
  if not path.is_file():
    raise MissingDataError(
      f"task {task}: {path} is missing; fill the data directory on a machine with network "
      f"(polylm-eval fetch --tasks {fetch} --data_dir DIR, then pass --data_dir DIR)"
    )
  return path.read_text(encoding="utf-8").splitlines()


def _pairs(
  task: str, direction: str, sources: list[str], targets: list[str], where: pathlib.Path
) -> dict:
  if len(sources) != len(targets):
    raise DataError(
      f"task {task}: {len(sources)} source and {len(targets)} reference lines under {where}"
    )
  src, tgt = direction.split("-")
  n = len(sources)
  return {"source": sources, "target": targets, "source_code": [src] * n, "target_code": [tgt] * n}


def read_flores(direction: str) -> dict[str, dict[str, list[str]]]:
  """{split: {'source': [...], 'target': [...], 'source_code': .., 'target_code': ..}} for dev
  (few-shot) and devtest."""
  src, tgt = direction.split("-")
  task = task_name("flores", direction)
  return {
    split: _pairs(
      task,
      direction,
      _lines(flores_file(src, split), task, "flores"),
      _lines(flores_file(tgt, split), task, "flores"),
      data_root() / "flores200_dataset" / split,
    )
    for split in ("dev", "devtest")
  }


def read_wmt20(direction: str) -> dict[str, dict[str, list[str]]]:
  task = task_name("wmt20", direction)
  src, ref = wmt20_files(direction)
  sources, references = _lines(src, task, "wmt20"), _lines(ref, task, "wmt20")
  return {"test": _pairs(task, direction, sources, references, src.parent)}


def prompt(source_code: str, target_code: str, text: str) -> str:
  src, tgt = languages_lib.name_of(source_code), languages_lib.name_of(target_code)
  return f"Translate the following text from {src} to {tgt}.\n{src}: {text}\n{tgt}:"


def bleu(hypotheses: list[str], references: list[str], target_code: str) -> float:
  import sacrebleu

  return sacrebleu.corpus_bleu(
    hypotheses, [references], tokenize=BLEU_TOKENIZE.get(target_code, "13a")
  ).score


def chrf(hypotheses: list[str], references: list[str]) -> float:
  import sacrebleu

  return sacrebleu.corpus_chrf(hypotheses, [references], word_order=2).score


# --- the shipped task YAMLs ---------------------------------------------------------------------
TASK_DIR = pathlib.Path(__file__).resolve().parent / "tasks" / "translation"

_TEMPLATE = """\
# Written by polylm_jax.eval.translation.write_task_yamls; edit that, not this file.
task: {task}
tag: [polylm_{benchmark}, polylm_translation]
custom_dataset: !function utils.{benchmark}
dataset_kwargs:
  direction: {direction}
output_type: generate_until
test_split: {test_split}
fewshot_split: {fewshot_split}
doc_to_text: !function utils.doc_to_text
doc_to_target: target
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 256
process_results: !function utils.process_results
metric_list:
  - metric: bleu
    aggregation: !function utils.bleu
    higher_is_better: true
  - metric: chrf
    aggregation: !function utils.chrf
    higher_is_better: true
metadata:
  version: 1.0
"""


def task_yamls() -> dict[str, str]:
  """{file name: YAML text} of every shipped translation task."""
  out = {}
  for benchmark, splits in (("wmt20", ("test", "test")), ("flores", ("devtest", "dev"))):
    for direction, task in families()[benchmark].items():
      out[f"{task}.yaml"] = _TEMPLATE.format(
        task=task,
        benchmark=benchmark,
        direction=direction,
        test_split=splits[0],
        fewshot_split=splits[1],
      )
  return out


def write_task_yamls(directory: pathlib.Path = TASK_DIR) -> None:
  for name, text in task_yamls().items():
    (directory / name).write_text(text)


# --- fetch (polylm-eval fetch, on a machine with network) ---------------------------------------
def _missing(task: str) -> list[pathlib.Path]:
  """The files a shipped translation task reads that are not there."""
  benchmark, _, direction = task.partition("_")
  files = (
    wmt20_files(direction)
    if benchmark == "wmt20"
    else [flores_file(c, s) for c in direction.split("-") for s in ("dev", "devtest")]
  )
  return [p for p in files if not p.is_file()]


def is_shipped(task: str) -> bool:
  benchmark, _, direction = task.partition("_")
  return direction in families().get(benchmark, {})


def fetch(tasks: list[str]) -> None:
  """Downloads the files the given shipped translation tasks read (those not there yet; other
  tasks are left to their own loading). FLORES-200 comes as its release tarball
  ($POLYLM_FLORES_URL overrides FLORES_URL, e.g. a mirror or a file:// copy), WMT20 through
  sacreBLEU into sacrebleu_dir()."""
  todo = [t for t in tasks if is_shipped(t) and _missing(t)]
  if any(t.startswith("flores_") for t in todo):
    _fetch_flores()
  for task in todo:
    if task.startswith("wmt20_"):
      _fetch_wmt20(task.partition("_")[2])
  for task in todo:
    if _missing(task):
      raise MissingDataError(
        f"task {task}: fetched, but {', '.join(map(str, _missing(task)))} still missing"
        + (
          " (sacreBLEU writes where $SACREBLEU pointed when it was first imported)"
          if task.startswith("wmt20_")
          else ""
        )
      )


def _fetch_flores() -> None:
  import shutil
  import tarfile
  import tempfile
  import urllib.request

  url = os.environ.get("POLYLM_FLORES_URL") or FLORES_URL
  root = data_root()
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix=".flores-") as tmp:
    tarball = pathlib.Path(tmp) / "flores200_dataset.tar.gz"
    try:
      with urllib.request.urlopen(url, timeout=60) as response, tarball.open("wb") as f:
        shutil.copyfileobj(response, f)
    except OSError as e:
      raise MissingDataError(
        f"FLORES-200 could not be downloaded from {url} ({type(e).__name__}: {e}); download "
        f"it where there is network and extract it into {root} (it holds flores200_dataset/), "
        f"or set POLYLM_FLORES_URL to a mirror"
      ) from e
    with tarfile.open(tarball) as tar:
      members = [
        m for m in tar.getmembers() if m.name.startswith("flores200_dataset/") and m.isfile()
      ]
      if not members:
        raise MissingDataError(f"{url}: the archive holds no flores200_dataset/ directory")
      # Into a scratch directory first, then moved file by file: files already there stay.
      tar.extractall(tmp, members=members, filter="data")
    for path in sorted((pathlib.Path(tmp) / "flores200_dataset").rglob("*")):
      target = root / path.relative_to(tmp)
      if path.is_dir():
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
      elif not target.exists():
        path.chmod(0o644)
        path.replace(target)


def _fetch_wmt20(direction: str) -> None:
  from sacrebleu.dataset import DATASETS

  dataset = DATASETS["wmt20"]
  try:
    dataset.process_to_text(direction)
  except (Exception, SystemExit) as e:  # sacreBLEU exits on a bad checksum or SSL failure
    raise MissingDataError(
      f"task {task_name('wmt20', direction)}: sacreBLEU could not fetch WMT20 {direction} "
      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); it needs "
      f"network access to data.statmt.org"
    ) from e
