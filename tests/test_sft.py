"""Instruction tuning: loss weights over prompts and responses, whole examples per segment,
truncation and skipped records counted, a tiny model that learns its examples, and exports whose
chat template reproduces the training ids."""

import json
import logging

import numpy as np
import pytest
import sentencepiece as spm
from runs import restore_env

from polylm_jax import chat, framing
from polylm_jax.data import instructions, pipeline, sample, tasks

SP = spm.SentencePieceProcessor(model_file=str(sample.TOKENIZER_MODEL))
VOCAB = tasks.vocabulary()


def _write(path, records):
  path.write_text(
    "".join(
      (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
    ),
    encoding="utf-8",
  )


def _examples(lang="th", n=12):
  lines, english = sample.sample_lines(lang), sample.sample_lines("en")
  return [
    {"instruction": f"แปล {i}", "input": english[i] if i % 2 else "", "output": lines[i]}
    for i in range(n)
  ]


def _rows(task, seq_len=64, split="train"):
  config = pipeline.DataConfig(
    mixture=task, seq_len=seq_len, batch_size=1, shuffle=False, split=split
  )
  return [{k: v[0] for k, v in b.items()} for b in pipeline.batches(config, num_epochs=1)]


def test_weights_are_0_on_prompts_and_1_on_responses_and_eos(tmp_path):
  records = _examples()
  _write(tmp_path / "th.jsonl", records)
  corpora = instructions.InstructionCorpora(
    files={"th": str(tmp_path / "th.jsonl")},
    prefix="sft_test_w_",
    mixture="sft_test_w",
    holdout_fraction=0.0,
  )
  assert corpora.register(VOCAB, seq_len=256)["th"]["truncated"] == {}
  expected = {}
  for r in records:
    ids, weights = chat.encode_turns(SP, [chat.Turn(r["instruction"], r["output"], r["input"])])
    expected[tuple(ids[1:])] = weights[1:]
  seen = []
  for row in _rows("sft_test_w_th", seq_len=256):
    for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      at = row["segment_ids"] == s
      targets = tuple(row["targets"][at].tolist())
      # Each segment is exactly one example: BOS first, positions from 0, its own weights.
      assert targets in expected, "a segment mixes examples or cuts one"
      assert row["inputs"][at][0] == framing.BOS_ID
      assert row["positions"][at].tolist() == list(range(at.sum()))
      np.testing.assert_array_equal(row["weights"][at], expected[targets])
      assert row["weights"][at][-1] == 1.0 and targets[-1] == framing.EOS_ID
      seen.append(targets)
    assert np.all(row["weights"][row["segment_ids"] == 0] == 0)
  assert sorted(seen) == sorted(expected)  # every example once per epoch


def test_truncation_keeps_responses_and_bad_records_are_counted(tmp_path, caplog):
  long_prompt = " ".join(sample.sample_lines("en")[:6])
  records = [
    {"instruction": long_prompt, "input": "", "output": "Short answer."},  # prompt cut
    {"instruction": "Q", "output": long_prompt},  # response cut (no EOS)
    {
      "turns": [
        {"instruction": long_prompt, "output": long_prompt},
        {"instruction": "Again?", "output": "Yes."},
      ]
    },  # oldest turn dropped
    '{"instruction": "broken json"',
    {"instruction": "No output"},
    {"instruction": "  ", "output": "x"},
    {"instruction": "Fine", "output": "Good."},
  ]
  _write(tmp_path / "en.jsonl", records)
  corpora = instructions.InstructionCorpora(
    files={"en": str(tmp_path / "en.jsonl")},
    prefix="sft_test_t_",
    mixture="sft_test_t",
    holdout_fraction=0.0,
    min_prompt_tokens=4,
  )
  with caplog.at_level(logging.INFO):
    stats = corpora.register(VOCAB, seq_len=32)["en"]
  assert stats["skipped"] == {"invalid_json": 1, "missing_field": 1, "empty": 1}
  assert stats["truncated"] == {"truncated_prompt": 1, "truncated_response": 1, "dropped_turns": 1}
  assert stats["train_examples"] == 4
  assert "instructions en: 4 train" in caplog.text and "skipped {" in caplog.text
  fmt = chat.InstructionFormat()
  ids, w, how = instructions.encode_example(
    SP, [chat.Turn(long_prompt, "Short answer.")], fmt, 32, min_prompt_tokens=4
  )
  answer = SP.encode("Short answer.") + [framing.EOS_ID]
  assert how == "truncated_prompt" and len(ids) == 33 and ids[-len(answer) :] == answer
  assert w[-len(answer) :] == [1.0] * len(answer) and set(w[: -len(answer)]) == {0.0}
  ids, w, how = instructions.encode_example(SP, [chat.Turn("Q", long_prompt)], fmt, 32)
  assert how == "truncated_response" and len(ids) == 33 and ids[-1] != framing.EOS_ID
  rows = _rows("sft_test_t_en", seq_len=32)  # every example fits a row after truncation
  assert sum(len(np.unique(r["segment_ids"][r["segment_ids"] > 0])) for r in rows) == 4
  assert instructions.dropped_counts("sft_test_t_en") == {
    "invalid_json": 1,
    "missing_field": 1,
    "empty": 1,
    "truncated_prompt": 1,
    "truncated_response": 1,
    "dropped_turns": 1,
  }


RECORDS = [
  {"instruction": q, "output": a}
  for q, a in zip(
    [
      "Capital of France?",
      "2 + 2 =",
      "Color of the sky?",
      "ทักทาย",
      "Hallo auf Englisch",
      "Say yes",
    ],
    ["Paris.", "4", "Blue.", "สวัสดี", "Hello", "Yes!"],
  )
]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
  """A model fine-tuned from scratch on RECORDS until it answers them, and its export."""
  from polylm_jax.export import export_cli
  from polylm_jax.train import train_cli as cli

  root = tmp_path_factory.mktemp("sft")
  _write(root / "en.jsonl", RECORDS)
  cli.main(
    [
      "--gin_file=gin_configs/sft/quickstart.gin",
      f"--workdir={root / 'run'}",
      "--gin_bindings=TrainerConfig.init_params_from = None",
      f"--gin_bindings=InstructionCorpora.files = {{'en': '{root / 'en.jsonl'}'}}",
      "--gin_bindings=InstructionCorpora.embedded_sample = False",
      "--gin_bindings=InstructionCorpora.holdout_fraction = 0.0",
      "--gin_bindings=train.epochs = None",
      "--gin_bindings=TrainerConfig.num_steps = 150",
      "--gin_bindings=TrainerConfig.eval_every = 0",
      "--gin_bindings=DataConfig.batch_size = 8",
      "--gin_bindings=DataConfig.seq_len = 32",
      "--gin_bindings=OptimizerConfig.peak_lr = 3e-3",
    ]
  )
  assert export_cli.main([f"--workdir={root / 'run'}", f"--out={root / 'hf'}"]) == 0
  return root


def test_a_tiny_model_learns_its_examples_and_its_export_chats_alike(tiny_sft):
  """Fine-tuned from scratch on six examples, greedy decoding answers them as trained; the export
  carries the chat template (same ids as training) and PolyLM's demo sampling defaults."""
  import transformers

  from polylm_jax import sharding
  from polylm_jax.decode import generate, loading

  records = RECORDS
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), __import__("jax").devices()[:1])
  loaded = loading.load(workdir=str(tiny_sft / "run"), mesh=mesh)
  gen = generate.Generator(loaded.config, loaded.params, SP, mesh=mesh)
  prompts = [
    chat.encode_turns(SP, [chat.Turn(r["instruction"])], answer_last=False)[0] for r in records
  ]
  answers = [c.text for c in gen.generate(prompts, max_new_tokens=8)]
  assert answers == [r["output"] for r in records]
  tok = transformers.AutoTokenizer.from_pretrained(tiny_sft / "hf")
  messages = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Say yes"},
  ]
  templated = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  templated = templated["input_ids"] if hasattr(templated, "keys") else list(templated)
  assert templated == chat.chat_prompt_ids(SP, [("Capital of France?", "Paris.")], "Say yes")
  generation = json.loads((tiny_sft / "hf" / "generation_config.json").read_text())
  assert generation["do_sample"] and generation["top_p"] == 0.8 and generation["temperature"] == 0.7


_QA_TASK = """\
task: sft_test_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{data}"
output_type: generate_until
test_split: test
doc_to_text: "{{{{instruction}}}}"
doc_to_target: "{{{{output}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_polylm_eval_chat_asks_in_the_instruction_format(tiny_sft, tmp_path, monkeypatch, capsys):
  """polylm-eval run --chat wraps each request in the model's instruction format (from the
  checkpoint, or read back from the export's chat template): the tiny model answers all six;
  asked plainly it does not. Few-shot examples become earlier turns with the training ids. A
  model that is not instruction-tuned is refused before its parameters are read."""
  import shutil

  from polylm_jax import sharding
  from polylm_jax.decode import loading
  from polylm_jax.eval import eval_cli, lm_eval_model

  restore_env(monkeypatch)
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  _write(tmp_path / "qa.jsonl", RECORDS)
  (tasks / "sft_test_qa.yaml").write_text(_QA_TASK.format(data=tmp_path / "qa.jsonl"))
  common = ["--tasks=sft_test_qa", f"--include_path={tasks}", "--dtype=float32"]

  def accuracy(out, *source):
    assert eval_cli.main(["run", *source, f"--out={tmp_path / out}", *common]) == 0
    return json.loads((tmp_path / out / "results.json").read_text())["tasks"]["sft_test_qa"]

  chat_run = accuracy("chat", f"--workdir={tiny_sft / 'run'}", "--chat")
  assert chat_run["value"] == 1.0
  assert accuracy("export", f"--hf_dir={tiny_sft / 'hf'}", "--chat")["value"] == 1.0
  assert accuracy("plain", f"--workdir={tiny_sft / 'run'}")["value"] < 1.0
  assert json.loads((tmp_path / "chat" / "run.json").read_text())["chat"] is True
  # Few-shot as earlier turns: the ids SFT trained on (prompt, answer, EOS, next prompt).
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), __import__("jax").devices()[:1])
  loaded = loading.load(workdir=str(tiny_sft / "run"), mesh=mesh)
  lm = lm_eval_model.PolyLMJax.from_parts(
    loaded.config, loaded.params, SP, mesh=mesh, instruction_format=loaded.instruction_format()
  )
  history = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Say yes"},
  ]
  assert lm.tok_encode(lm.apply_chat_template(history)) == chat.chat_prompt_ids(
    SP, [("Capital of France?", "Paris.")], "Say yes"
  )
  # An export without a chat template is not instruction-tuned: refused, nothing written.
  plain = tmp_path / "plain_hf"
  shutil.copytree(tiny_sft / "hf", plain)
  config = json.loads((plain / "tokenizer_config.json").read_text())
  del config["chat_template"]
  (plain / "tokenizer_config.json").write_text(json.dumps(config))
  capsys.readouterr()
  args = ["run", f"--hf_dir={plain}", f"--out={tmp_path / 'refused'}", "--chat", *common]
  assert eval_cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err == (
    f"polylm-eval: --chat: {plain} is not instruction-tuned (its checkpoint records no "
    f"instruction format; an export of one has a chat template); evaluate it without --chat"
  )
  assert not (tmp_path / "refused" / "results.json").exists()


def test_epochs_set_the_steps_and_a_constant_schedule_stays_at_peak():
  from polylm_jax.optimizer import OptimizerConfig, lr_schedule

  schedule = lr_schedule(OptimizerConfig(peak_lr=1e-3, warmup_steps=10, schedule="constant"), 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == float(schedule(99)) == pytest.approx(1e-3, rel=1e-6)
  stats = {"a": {"rows": 30}, "b": {"rows": 20}}
  assert instructions.steps_for_epochs(stats, 2, 8) == 13
  assert instructions.greedy_rows([10, 20, 40, 5, 60], 64) == [[0, 1], [2, 3], [4]]
  with pytest.raises(ValueError, match="set files, directory or embedded_sample"):
    instructions.InstructionCorpora()


def test_epochs_and_a_step_count_are_one_choice(tmp_path):
  """sft/quickstart.gin trains a number of epochs; a step count given as well is refused (it
  would otherwise be replaced by the epochs' count without a word)."""
  from polylm_jax.train import train_cli as cli

  args = [
    "--gin_file=sft/quickstart.gin",
    f"--workdir={tmp_path / 'run'}",
    "--gin_bindings=TrainerConfig.init_params_from = None",
  ]
  with pytest.raises(SystemExit, match="both train.epochs = 2 and TrainerConfig.num_steps = 5"):
    cli.main(args + ["--gin_bindings=TrainerConfig.num_steps = 5"])
  with pytest.raises(SystemExit, match="TrainerConfig.num_steps is None: set the number of steps"):
    cli.main(args + ["--gin_bindings=train.epochs = None"])
