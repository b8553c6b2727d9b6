"""The lm-eval model `polylm_jax`: per-request log-likelihoods equal lm-eval's own `hf` model on the
export (float32, 1e-3) and accuracies are identical, on local tasks (tests/fixtures/lm_eval); few
compiled shapes; generation tasks run."""

import collections
import json
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm
from runs import FEW_LANGUAGE_FLAGS, SHORT_FLAGS, restore_env

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from polylm_jax.eval import lm_eval_model, suite  # noqa: E402
from polylm_jax.export import export_cli  # noqa: E402


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
  from polylm_jax.train import train_cli as cli

  root = tmp_path_factory.mktemp("lmeval")
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={root / 'run'}",
      "--gin_bindings=TrainerConfig.num_steps = 30",
      "--gin_bindings=TrainerConfig.eval_every = 0",
      *SHORT_FLAGS,
      *FEW_LANGUAGE_FLAGS,
    ]
  )
  assert export_cli.main([f"--workdir={root / 'run'}", f"--out={root / 'hf'}"]) == 0
  return root / "run", root / "hf"


def _evaluate(model, tasks, include, **kwargs):
  return evaluator.simple_evaluate(
    model=model,
    tasks=tasks,
    task_manager=suite.task_manager(str(include)),
    log_samples=True,
    bootstrap_iters=0,
    **kwargs,
  )


def _entries(manager):
  return {k: (e.kind, e.yaml_path, e.tags) for k, e in manager.task_index.items()}


def test_the_task_index_is_lm_evals_own_and_sees_tasks_added_since_the_last_call(lm_eval_tasks):
  """polylm-eval's TaskManager indexes lm-eval's own ~14,000 YAMLs once per process and the
  shipped and included directories at every call: its index is the one lm-eval's TaskManager
  builds over the same directories (an included task overriding one of lm-eval's by name, a tag
  of its own), and a task added to the include path after a first call is found by the next."""
  include = lm_eval_tasks
  yaml = (include / "polylm_test_mc_en.yaml").read_text()
  assert "task: polylm_test_mc_en" in yaml
  mine = yaml.replace("task: polylm_test_mc_en", "task: arc_easy\ntag: polylm_test_tag")
  (include / "own_arc_easy.yaml").write_text(mine)
  paths = [*(str(d) for d in suite.TASK_DIRS), str(include)]
  theirs = TaskManager(include_path=paths)
  ours = suite.task_manager(str(include))
  assert _entries(ours) == _entries(theirs)
  for names in ("all_tasks", "all_subtasks", "all_groups", "all_tags"):
    assert getattr(ours, names) == getattr(theirs, names), names
  assert ours.task_index["arc_easy"].yaml_path == include / "own_arc_easy.yaml"
  assert "polylm_test_tag" in ours.all_tags and "wmt20_de-en" in ours.all_tasks
  assert "polylm_test_added" not in ours.all_tasks
  added = yaml.replace("task: polylm_test_mc_en", "task: polylm_test_added")
  (include / "added.yaml").write_text(added)
  again = suite.task_manager(str(include))
  assert "polylm_test_added" in again.all_tasks
  assert again.load(["polylm_test_added"])["tasks"]["polylm_test_added"].config.task == (
    "polylm_test_added"
  )


def test_loglikelihoods_and_accuracy_equal_lm_evals_hf_model(run_and_export, lm_eval_tasks):
  workdir, hf_dir = run_and_export
  include = lm_eval_tasks
  tasks = ["polylm_test_mc_en", "polylm_test_mc_th"]
  ours = lm_eval_model.PolyLMJax(workdir=str(workdir), batch_size=8, dtype="float32")
  mine = _evaluate(ours, tasks, include)
  from lm_eval.models.huggingface import HFLM

  theirs = _evaluate(
    HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=8, device="cpu"), tasks, include
  )
  for task in tasks:
    assert mine["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    a = [r[0][0] for s in mine["samples"][task] for r in s["resps"]]
    b = [r[0][0] for s in theirs["samples"][task] for r in s["resps"]]
    assert len(a) == len(b) == 30 and len(set(np.round(a, 3))) > 20  # real, varied numbers
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
  # Sorted by length and padded to a few buckets: a handful of compiled shapes for 60 requests.
  assert len(ours.scorer.compiled_shapes) <= 6


def test_rolling_loglikelihood_and_generation_tasks(run_and_export, lm_eval_tasks):
  workdir, hf_dir = run_and_export
  ours = lm_eval_model.PolyLMJax(hf_dir=str(hf_dir), batch_size=4)
  result = _evaluate(ours, ["polylm_test_gen_en"], lm_eval_tasks)
  samples = result["samples"]["polylm_test_gen_en"]
  assert len(samples) == 10 and all(isinstance(s["resps"][0][0], str) for s in samples)
  assert 0.0 <= result["results"]["polylm_test_gen_en"]["exact_match,none"] <= 1.0

  class Request:
    def __init__(self, text):
      self.args = (text,)

  texts = ["Hello world, this is a test.", "x" * 700]  # the second spans several windows
  rolling = ours.loglikelihood_rolling([Request(t) for t in texts], disable_tqdm=True)
  # The same sums, token by token from the whole forward (BOS, then the text).
  from polylm_jax.model import params as P

  forward = jax.jit(lambda p, x: jax.nn.log_softmax(P.apply(ours.scorer.graphdef, p, x), -1))
  for text, got in zip(texts[:1], rolling[:1]):
    ids = [1] + ours.sp.encode(text)
    logp = np.asarray(forward(ours.scorer.params, np.asarray([ids[:-1]])))[0]
    want = float(sum(logp[i, t] for i, t in enumerate(ids[1:])))
    assert abs(got - want) < 1e-3
  assert rolling[1] < rolling[0] < 0


def test_generated_answers_equal_lm_evals_hf_model_cut_at_the_first_stop(
  run_and_export, lm_eval_tasks
):
  """`until` cuts the text at the first stop string whatever ended the generation: also where
  the stop string came in the same chunk of tokens as the length limit, as lm-eval's `hf` model
  cuts it."""
  workdir, hf_dir = run_and_export
  include = lm_eval_tasks
  ours = lm_eval_model.PolyLMJax(workdir=str(workdir), batch_size=4, dtype="float32")
  from lm_eval.models.huggingface import HFLM

  theirs = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=4, device="cpu")
  texts = lambda model, task: [
    s["resps"][0][0] for s in _evaluate(model, [task], include)["samples"][task]
  ]
  # A stop string the model writes after its answers' first token (which comes alone, from the
  # prefill): it arrives in the chunk of tokens that also reaches the length limit.
  plain = texts(ours, "polylm_test_gen_en")

  def after_first_token(o: str) -> bool:
    first = ours.sp.decode(ours.sp.encode(o)[:1])
    return o.find(o[-2:]) + 2 > len(first)

  ends = collections.Counter(
    o[-2:] for o in plain if len(o) >= 4 and "\n" not in o[-2:] and after_first_token(o)
  )
  assert ends, plain
  stop = ends.most_common(1)[0][0]
  task = "polylm_test_gen_stop_en"
  yaml = (include / "polylm_test_gen_en.yaml").read_text()
  until = "  until:\n    - " + json.dumps(stop) + '\n    - "\\n"\n'
  (include / f"{task}.yaml").write_text(
    yaml.replace("task: polylm_test_gen_en", f"task: {task}").replace(
      '  until:\n    - "\\n"\n', until
    )
  )
  assert json.dumps(stop) in (include / f"{task}.yaml").read_text()
  mine, hf = texts(ours, task), texts(theirs, task)
  assert mine == hf
  assert sum(len(m) < len(p) for m, p in zip(mine, plain)) >= 1 and not any(stop in m for m in mine)


def test_polylm_eval_runs_resumes_compares_and_names_bad_input(
  run_and_export, tmp_path, monkeypatch, caplog, capsys, lm_eval_tasks
):
  import logging

  from polylm_jax.eval import eval_cli

  restore_env(monkeypatch)
  workdir, hf_dir = run_and_export
  include = lm_eval_tasks
  common = [
    "--tasks=polylm_test_mc_en,polylm_test_mc_th",
    f"--include_path={include}",
    "--batch_size=8",
    "--dtype=float32",
  ]
  out = tmp_path / "ckpt"
  assert eval_cli.main(["run", f"--workdir={workdir}", f"--out={out}", *common]) == 0
  results = json.loads((out / "results.json").read_text())["tasks"]
  assert sorted(results) == ["polylm_test_mc_en", "polylm_test_mc_th"]
  table = (out / "results.md").read_text()
  assert "### polylm_test_mc (acc, %)" in table and "| run | en | th | avg |" in table
  assert (out / "polylm_test_mc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Run again: the finished tasks are reused, nothing is recomputed.
  with caplog.at_level(logging.INFO):
    assert eval_cli.main(["run", f"--workdir={workdir}", f"--out={out}", *common]) == 0
  assert "reusing 2 finished task(s)" in caplog.text and "0 task(s) to run" in caplog.text
  # The export gives the same accuracies; two runs side by side.
  assert eval_cli.main(["run", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'hf'}", *common]) == 0
  exported = json.loads((tmp_path / "hf" / "results.json").read_text())["tasks"]
  assert {t: r["value"] for t, r in exported.items()} == {t: r["value"] for t, r in results.items()}
  assert (
    eval_cli.main(
      [
        "compare",
        str(out),
        str(tmp_path / "hf"),
        "--labels=jax,export",
        f"--out={tmp_path / 'both'}",
      ]
    )
    == 0
  )
  both = (tmp_path / "both" / "results.md").read_text()
  assert "| jax |" in both and "| export |" in both
  # A task outside the suite's families (a generation task): its first metric is the headline;
  # lm-eval's INFO lines and its warning about overriding an unset number of shots stay out.
  caplog.clear()
  gen = ["--tasks=polylm_test_gen_en", f"--include_path={include}", "--limit=4"]
  with caplog.at_level(logging.INFO):
    assert eval_cli.main(["run", f"--workdir={workdir}", f"--out={tmp_path / 'gen'}", *gen]) == 0
  assert "### polylm_test_gen (exact_match, %)" in (tmp_path / "gen" / "results.md").read_text()
  assert "reports exact_match first" in caplog.text
  assert "Overwriting default num_fewshot" not in caplog.text, caplog.text
  assert "Selected tasks" not in caplog.text, caplog.text
  capsys.readouterr()
  # Bad input: an unknown task lists close matches; missing data names the task and the cache.
  assert (
    eval_cli.main(
      [
        "run",
        f"--workdir={workdir}",
        f"--out={tmp_path / 'x'}",
        "--tasks=polylm_test_mc_eng",
        f"--include_path={include}",
      ]
    )
    == 2
  )
  assert "did you mean polylm_test_mc_en" in capsys.readouterr().err
  empty = tmp_path / "empty_cache"
  assert (
    eval_cli.main(
      [
        "run",
        f"--workdir={workdir}",
        f"--out={tmp_path / 'y'}",
        "--tasks=xnli",
        "--languages=th",
        f"--data_dir={empty}",
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "task xnli_th: its data could not be loaded offline" in err and str(empty) in err
  # Results never go into a training workdir or an export.
  for into, what in ((workdir, "a training workdir"), (hf_dir, "an export")):
    before = sorted(p.name for p in into.iterdir())
    assert eval_cli.main(["run", f"--workdir={workdir}", f"--out={into}", *common]) == 2
    assert f"--out={into} is {what}" in capsys.readouterr().err
    assert sorted(p.name for p in into.iterdir()) == before


def test_in_training_evaluation_logs_accuracy_per_task(tmp_path, lm_eval_tasks):
  from polylm_jax.train import train_cli as cli

  include = lm_eval_tasks
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={tmp_path / 'run'}",
      "--gin_bindings=TrainerConfig.num_steps = 4",
      "--gin_bindings=TrainerConfig.eval_every = 2",
      *SHORT_FLAGS,
      "--gin_bindings=TrainerConfig.lm_eval_every = 2",
      "--gin_bindings=TrainerConfig.lm_eval_tasks = ['polylm_test_mc_en', 'polylm_test_mc_th']",
      f"--gin_bindings=TrainerConfig.lm_eval_include_path = '{include}'",
      *FEW_LANGUAGE_FLAGS,
    ]
  )
  records = [
    json.loads(line) for line in (tmp_path / "run" / "eval_metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    assert 0.0 <= r["lm_eval/polylm_test_mc_th/acc"] <= 1.0 and r["lm_eval_seconds"] > 0
    assert "val_loss/th" in r  # next to the held-out loss per language


def test_one_token_stream_from_training_to_serving(run_and_export):
  """A text's ids are the same in training's packed rows, polylm-generate, the lm-eval model and
  transformers' tokenizer on the export (what vLLM uses too): BOS, then the SentencePiece ids."""
  import tensorflow as tf
  import transformers

  from polylm_jax.data import packing
  from polylm_jax.decode import generate

  workdir, hf_dir = run_and_export
  text = "Translate to German: Good morning, how are you?"
  lm = lm_eval_model.PolyLMJax(workdir=str(workdir), batch_size=4)
  ids = lm.sp.encode(text)
  docs = tf.data.Dataset.from_tensors({"targets": tf.constant(ids + [2], tf.int32)})
  row = next(iter(packing.pack(docs, 64, flush=True)))
  training = (
    row["inputs"].numpy()[: len(ids) + 1].tolist()
  )  # what the model sees before each target
  served = transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
  generator = generate.Generator(
    lm.scorer.config, lm.scorer.params, lm.sp, mesh=lm.scorer.mesh, framing=lm.framing
  )
  assert training == generator.encode(text) == lm.tok_encode(text) == served == [1] + ids


def test_scores_are_the_same_on_a_sharded_mesh(run_and_export):
  from polylm_jax import sharding
  from polylm_jax.decode import loading
  from polylm_jax.eval.scoring import Scorer

  workdir, _ = run_and_export
  rng = np.random.default_rng(0)
  items = []
  for n in (5, 17, 40, 63, 9, 33):
    row = [1] + rng.integers(3, 4096, n).tolist()
    items.append((row[:-1], row[1:], max(0, n - 4)))
  results = []
  for spec, count in (("1,1,1", 1), ("2,1,2", 4)):
    mesh = sharding.make_mesh(sharding.parse_mesh(spec), jax.devices()[:count])
    loaded = loading.load(workdir=str(workdir), mesh=mesh)
    results.append(Scorer(loaded.config, loaded.params, mesh=mesh, batch_size=4).score(items))
  np.testing.assert_allclose(
    [s.logprob for s in results[0]], [s.logprob for s in results[1]], atol=1e-4
  )
  assert [s.greedy for s in results[0]] == [s.greedy for s in results[1]]


def test_polylm_eval_runs_the_translation_families_on_local_data(
  run_and_export, tmp_path, monkeypatch
):
  """polylm-eval run --tasks=translation on local WMT20/FLORES files: a task per direction of the
  model's languages, BLEU and chrF++ that are sacreBLEU's on the generated translations, tables
  with directions as columns."""
  import sacrebleu
  from test_eval_families import EN, JA, write_flores, write_wmt20

  from polylm_jax.eval import eval_cli

  restore_env(monkeypatch)
  workdir, hf_dir = run_and_export
  data = tmp_path / "data"
  write_flores(data, {"en": EN, "ja": JA})
  write_wmt20(data / "sacrebleu", "en-ja", EN, JA)
  write_wmt20(data / "sacrebleu", "ja-en", JA, EN)
  out = tmp_path / "translation"
  args = ["run", f"--hf_dir={hf_dir}", f"--out={out}", "--tasks=translation", "--languages=en,ja"]
  assert eval_cli.main([*args, f"--data_dir={data}", "--dtype=float32", "--limit=3"]) == 0
  results = json.loads((out / "results.json").read_text())["tasks"]
  assert sorted(results) == ["flores_en-ja", "flores_ja-en", "wmt20_en-ja", "wmt20_ja-en"]
  assert {r["metric"] for r in results.values()} == {"bleu", "chrf"}
  table = (out / "results.md").read_text()
  assert "### wmt20 (BLEU)" in table and "### flores (chrF++)" in table
  assert "| run | en-ja | ja-en | avg |" in table
  # The recorded scores are sacreBLEU's on the model's own translations (the same greedy texts
  # through lm-eval with samples logged).
  monkeypatch.setenv("HF_HOME", str(data))
  ours = lm_eval_model.PolyLMJax(hf_dir=str(hf_dir), batch_size=16, dtype="float32")
  run = evaluator.simple_evaluate(
    model=ours,
    tasks=["wmt20_ja-en"],
    task_manager=suite.task_manager(),
    log_samples=True,
    bootstrap_iters=0,
    limit=3,
  )
  texts = [s["filtered_resps"][0].strip() for s in run["samples"]["wmt20_ja-en"]]
  assert len(texts) == 3 and all("\n" not in t for t in texts)
  record = results["wmt20_ja-en"]
  assert record["value"] == pytest.approx(sacrebleu.corpus_bleu(texts, [EN]).score)
  chrf = sacrebleu.corpus_chrf(texts, [EN], word_order=2).score
  assert chrf > 0 and record["metrics"]["chrf,none"] == pytest.approx(chrf)


def test_heldout_bits_per_byte_equal_a_direct_computation_with_transformers(
  run_and_export, tmp_path
):
  """polylm-eval's heldout family (BOS + tokens + EOS per line, every predicted token's bits
  over the text's UTF-8 bytes; a line longer than the context in windows) against the same
  definition computed with transformers on the export, float32."""
  import math

  import torch
  import transformers

  from polylm_jax.data import sample
  from polylm_jax.eval import eval_cli, heldout

  workdir, hf_dir = run_and_export
  texts = tmp_path / "texts"
  texts.mkdir()
  docs = {lang: sample.sample_lines(lang, "validation")[:6] for lang in ("en", "th")}
  docs["th"].append(" ".join(sample.sample_lines("th", "validation")[:40]))  # > 128 tokens
  for lang, lines in docs.items():
    (texts / f"{lang}.txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
  out = tmp_path / "eval"
  common = ["--tasks=heldout", f"--heldout={texts}", "--dtype=float32", "--languages=en,th,de"]
  assert eval_cli.main(["run", f"--workdir={workdir}", f"--out={out}", *common]) == 0
  results = json.loads((out / "results.json").read_text())["tasks"]
  assert sorted(results) == ["heldout_en", "heldout_th"]  # no de.txt: de is left out
  assert "### heldout (bits per byte, lower is better)" in (out / "results.md").read_text()

  sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
  context = model.config.max_position_embeddings
  assert max(len(sp.encode(d)) for d in docs["th"]) + 2 > context  # the windows are exercised
  for lang, lines in docs.items():
    nats = 0.0
    for text in lines:
      full = [1, *sp.encode(text), 2]
      for begin in range(0, len(full) - 1, context):
        end = min(begin + context, len(full) - 1)
        with torch.no_grad():
          logits = model(torch.tensor([full[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        nats -= float(
          logp[torch.arange(end - begin), torch.tensor(full[begin + 1 : end + 1])].sum()
        )
    expected = nats / math.log(2) / sum(len(t.encode("utf-8")) for t in lines)
    got = results[heldout.task_name(lang)]
    assert got["value"] == pytest.approx(expected, rel=1e-4), lang
    assert got["metrics"]["documents"] == len(lines)
  # A --heldout that is neither 'sample' nor a directory: refused before any model is loaded.
  assert (
    eval_cli.main(
      [
        "run",
        f"--workdir={workdir}",
        f"--out={tmp_path / 'x'}",
        "--tasks=heldout",
        f"--heldout={tmp_path / 'none'}",
      ]
    )
    == 2
  )
