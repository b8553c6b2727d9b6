"""polylm-eval's benchmark families beyond the paper's understanding set: the shipped translation
tasks (WMT20, FLORES-200) read from local files and scored with sacreBLEU, their fetch, and the
lm-eval families of today's multilingual set, restricted to the model's languages."""

import io
import os
import pathlib
import tarfile

import pytest
from runs import restore_env

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from polylm_jax.errors import MissingDataError  # noqa: E402
from polylm_jax.eval import report, suite, translation  # noqa: E402

EN = ["The cat sat on the mat.", "It rained all day.", "We went home early."]
DE = ["Die Katze saß auf der Matte.", "Es regnete den ganzen Tag.", "Wir gingen früh nach Hause."]
JA = ["猫はマットの上に座った。", "一日中雨が降った。", "私たちは早く家に帰った。"]


def write_flores(root: pathlib.Path, texts: dict[str, list[str]]) -> None:
  """Files in the FLORES-200 release's layout (flores200_dataset/<split>/<code>.<split>): devtest
  the given lines, dev the first of them only."""
  for split in ("dev", "devtest"):
    (root / "flores200_dataset" / split).mkdir(parents=True, exist_ok=True)
    for code, lines in texts.items():
      path = root / "flores200_dataset" / split / f"{translation.FLORES_CODES[code]}.{split}"
      path.write_text("\n".join(lines[:1] if split == "dev" else lines) + "\n", encoding="utf-8")


def write_wmt20(root: pathlib.Path, direction: str, src: list[str], ref: list[str]) -> None:
  """Files in sacreBLEU's cache layout (wmt20/wmt20.<pair>.src and .ref)."""
  (root / "wmt20").mkdir(parents=True, exist_ok=True)
  (root / "wmt20" / f"wmt20.{direction}.src").write_text("\n".join(src) + "\n", encoding="utf-8")
  (root / "wmt20" / f"wmt20.{direction}.ref").write_text("\n".join(ref) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def manager():
  return suite.task_manager()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HOME", str(tmp_path / "data"))
  monkeypatch.delenv("SACREBLEU", raising=False)
  return tmp_path / "data"


def test_every_family_names_tasks_lm_eval_knows(manager):
  known = set(manager.all_tasks)
  missing = [t for tasks in suite.FAMILIES.values() for t in tasks.values() if t not in known]
  assert not missing, missing


def test_every_lm_eval_family_loads_or_asks_for_its_data(manager):
  """Offline, a family's task either loads (its data cached) or fails for want of data, never
  for a broken task module."""
  for family, tasks in suite.FAMILIES.items():
    if family in translation.families():
      continue
    task = next(iter(tasks.values()))
    try:
      manager.load([task])
    except (ConnectionError, FileNotFoundError) as e:
      assert "Hub" in str(e) or "not found" in str(e).lower() or "offline" in str(e).lower(), e


def test_families_and_sets_keep_the_models_languages(manager):
  known = set(manager.all_tasks)
  specs = suite.resolve(["translation"], ["en", "de", "ja", "th"], known)
  wmt = sorted(s.language for s in specs if s.family == "wmt20")
  flores = sorted(s.language for s in specs if s.family == "flores")
  assert wmt == ["de-en", "en-de", "en-ja", "ja-en"]  # de-fr needs French too
  assert flores == ["de-en", "en-de", "en-ja", "en-th", "ja-en", "th-en"]
  assert {s.metric for s in specs if s.family == "wmt20"} == {"bleu"}
  assert {s.metric for s in specs if s.family == "flores"} == {"chrf"}
  modern = suite.resolve(["modern"], ["en", "zh", "he"], known)
  by_family = {}
  for s in modern:
    by_family.setdefault(s.family, []).append(s.task)
  assert by_family["belebele"] == ["belebele_eng_Latn", "belebele_heb_Hebr", "belebele_zho_Hans"]
  assert by_family["mgsm"] == ["mgsm_direct_en", "mgsm_direct_zh"]
  assert by_family["global_mmlu"] == ["global_mmlu_en", "global_mmlu_zh"]
  assert by_family["mlqa"] == ["mlqa_en_en", "mlqa_zh_zh"]
  assert "flores_en-he" in by_family["flores"] and "flores_en-zh" in by_family["flores"]
  with pytest.raises(ValueError, match="unknown task 'translatoin'; did you mean translation"):
    suite.resolve(["translatoin"], ["en"], known)


def test_the_shipped_task_yamls_are_the_generators():
  shipped = {p.name: p.read_text() for p in translation.TASK_DIR.glob("*.yaml")}
  assert shipped == translation.task_yamls()
  assert "wmt20_en-ja.yaml" in shipped and "flores_en-th.yaml" in shipped


def test_translation_tasks_read_local_files_prompt_and_score_with_sacrebleu(manager, data_dir):
  import sacrebleu

  write_flores(data_dir, {"en": EN, "de": DE})
  write_wmt20(data_dir / "sacrebleu", "en-ja", EN, JA)
  specs = suite.resolve(["flores_en-de", "wmt20_en-ja"], ["en", "de", "ja"], manager.all_tasks)
  tasks = suite.load_tasks(specs, manager)
  flores, wmt = tasks["flores_en-de"], tasks["wmt20_en-ja"]
  docs = list(flores.eval_docs)
  assert [d["source"] for d in docs] == EN and [d["target"] for d in docs] == DE
  assert flores.doc_to_text(docs[0]) == (
    "Translate the following text from English to German.\n"
    "English: The cat sat on the mat.\nGerman:"
  )
  # FLORES: shots from the dev split (here one sentence), then the document; the answer is the
  # rest of the line.
  flores.set_config(key="num_fewshot", value=1)
  flores.build_all_requests(limit=2, rank=0, world_size=1)
  context = flores.instances[1].args[0]
  assert context == (
    "Translate the following text from English to German.\n"
    "English: The cat sat on the mat.\nGerman: Die Katze saß auf der Matte.\n\n"
    "Translate the following text from English to German.\n"
    "English: It rained all day.\nGerman:"
  )
  assert flores.instances[1].args[1]["until"] == ["\n"]
  # WMT20 has a test set only: a shot is another document of it, never the document itself.
  wmt.set_config(key="num_fewshot", value=2)
  wmt.build_all_requests(limit=3, rank=0, world_size=1)
  for instance in wmt.instances:
    context = instance.args[0]
    source = context.rpartition("English: ")[2].partition("\n")[0]
    assert context.count("English:") == 3 and context.count(source) == 1, context
  # The task's own metric hooks: corpus BLEU with WMT's tokenizer for the target language.
  hypotheses = ["猫がマットに座った。", "一日中雨だった。", "早く家に帰った。"]
  items = [
    wmt.process_results(doc, [" " + h + " "])["bleu"] for doc, h in zip(wmt.eval_docs, hypotheses)
  ]
  aggregate = wmt.aggregation()
  want = sacrebleu.corpus_bleu(hypotheses, [JA], tokenize="ja-mecab").score
  assert aggregate["bleu"](items) == pytest.approx(want)
  assert want != pytest.approx(sacrebleu.corpus_bleu(hypotheses, [JA]).score)  # 13a differs
  assert aggregate["chrf"](items) == pytest.approx(
    sacrebleu.corpus_chrf(hypotheses, [JA], word_order=2).score
  )


def test_missing_translation_data_names_the_task_the_file_and_the_fetch(manager, data_dir):
  write_flores(data_dir, {"en": EN})
  specs = suite.resolve(["flores_en-de"], ["en", "de"], manager.all_tasks)
  with pytest.raises(MissingDataError) as e:
    suite.load_tasks(specs, manager)
  message = str(e.value)
  assert message.startswith("task flores_en-de: ") and "deu_Latn.dev is missing" in message
  assert "polylm-eval fetch --tasks flores --data_dir DIR" in message


def _release_tarball(path: pathlib.Path, texts: dict[str, list[str]]) -> None:
  with tarfile.open(path, "w:gz") as tar:
    for split in ("dev", "devtest"):
      for code, lines in texts.items():
        data = ("\n".join(lines) + "\n").encode()
        name = f"{translation.FLORES_CODES[code]}.{split}"
        info = tarfile.TarInfo(f"flores200_dataset/{split}/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_fetch_gets_flores_from_its_release_and_keeps_files_already_there(
  tmp_path, monkeypatch, capsys
):
  """polylm-eval fetch --tasks=flores: the release tarball (here a file:// copy) is unpacked into
  --data_dir; a file already there is not replaced; no Hugging Face Hub is needed."""
  from polylm_jax.eval import eval_cli

  restore_env(monkeypatch)
  monkeypatch.setenv("HF_ENDPOINT", "https://no-such-hub.invalid")
  tarball = tmp_path / "flores200_dataset.tar.gz"
  _release_tarball(tarball, {"en": EN, "de": DE, "ja": JA})
  monkeypatch.setenv("POLYLM_FLORES_URL", tarball.as_uri())
  data = tmp_path / "data"
  kept = data / "flores200_dataset" / "dev" / "eng_Latn.dev"
  kept.parent.mkdir(parents=True)
  own = "".join(f"a user's own line {i}\n" for i in range(3))
  kept.write_text(own)
  args = ["fetch", "--tasks=flores", "--languages=en,de", f"--data_dir={data}"]
  assert eval_cli.main(args) == 0
  assert "fetched 2 task(s)" in capsys.readouterr().out
  assert kept.read_text() == own
  fetched = data / "flores200_dataset" / "devtest" / "deu_Latn.devtest"
  assert fetched.read_text().splitlines() == DE
  assert fetched.stat().st_mode & 0o777 == 0o644
  assert not list(data.glob(".flores-*"))  # the download's scratch directory is gone
  # A release that cannot be reached: one line naming the URL and where to put a manual copy.
  monkeypatch.setenv("POLYLM_FLORES_URL", (tmp_path / "nowhere.tar.gz").as_uri())
  args = ["fetch", "--tasks=flores_en-th", f"--data_dir={tmp_path / 'other'}"]
  assert eval_cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("polylm-eval: FLORES-200 could not be downloaded from file://")
  assert f"extract it into {tmp_path / 'other'}" in err


def test_translation_tables_show_directions_and_bleu_as_is(tmp_path):
  records = {
    f"wmt20_{d}": dict(family="wmt20", language=d, metric="bleu", value=v)
    for d, v in (("en-de", 21.37), ("de-en", 30.0))
  }
  table = report.markdown([records], ["final"])
  assert "### wmt20 (BLEU)" in table
  assert "| run | en-de | de-en | avg |" in table and "| final | 21.4 | 30.0 | 25.7 |" in table


def test_a_run_without_its_data_stops_before_the_model_is_read(tmp_path, monkeypatch, capsys):
  """The tasks' data (and --chat's need for an instruction-tuned model) are checked from the
  model's metadata alone: here the export directory has no weights at all, and the run still
  stops on what is wrong with the data, writing nothing."""
  from polylm_jax.eval import eval_cli

  restore_env(monkeypatch)
  empty = tmp_path / "hf"
  empty.mkdir()
  out = tmp_path / "out"
  common = [f"--hf_dir={empty}", f"--out={out}", f"--data_dir={tmp_path / 'data'}"]
  assert eval_cli.main(["run", *common, "--tasks=flores_en-de", "--languages=en,de"]) == 2
  stderr = capsys.readouterr().err
  err = stderr.strip().splitlines()[-1]
  assert err.startswith("polylm-eval: task flores_en-de: ") and "eng_Latn.dev is missing" in err
  assert "--metadata" not in stderr  # lm-eval's hint about its own command line stays out
  assert eval_cli.main(["run", *common, "--tasks=flores_en-de", "--chat"]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"polylm-eval: --chat: {empty} is not instruction-tuned")
  assert not out.exists()
