"""Generation: the KV-cache path equals recomputing the forward; greedy output equals transformers
`generate` on the export; sampling is seeded and its filters match transformers'; prompts are
never truncated silently; polylm-generate from a workdir and from an export."""

import json
import logging
import os

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from runs import FEW_LANGUAGE_FLAGS, SHORT_FLAGS

from polylm_jax import framing, sharding
from polylm_jax.config import PRESETS
from polylm_jax.data import sample
from polylm_jax.decode import generate, generate_cli, sampling
from polylm_jax.export import hf_export
from polylm_jax.model import params as P

CFG = PRESETS["tiny"]
SP = spm.SentencePieceProcessor(model_file=str(sample.TOKENIZER_MODEL))
PROMPTS = [sample.sample_lines("en")[3][:40], "A", sample.sample_lines("th")[5][:60]]


@pytest.fixture(scope="module")
def params():
  """A tiny model with spiky logits (random weights scaled up), so greedy paths vary."""
  base = P.init_params(CFG, 1)
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
    jax.device_get(base),
  )


def _generator(params, cfg=CFG, mesh_shape=(1, 1, 1), layout="auto"):
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices)
  placed = jax.device_put(
    params,
    sharding.tree_shardings(
      P.logical_axes(cfg), P.abstract_params(cfg), mesh, sharding.DEFAULT_RULES
    ),
  )
  return generate.Generator(cfg, placed, SP, mesh=mesh, layout=layout)


@pytest.mark.parametrize(
  "scan,layout,mesh_shape",
  [
    (True, "scan", (1, 1, 1)),
    (True, "unrolled", (1, 2, 2)),
    (False, "unrolled", (2, 1, 2)),
    (False, "scan", (1, 1, 1)),
  ],
)
def test_kv_cache_equals_recomputing_the_whole_forward(params, scan, layout, mesh_shape):
  """Both decode layouts, from stacked and per-layer parameters, sharded and not."""
  cfg = CFG.replace(scan_layers=scan)
  p = params if scan else P.scan_to_unscanned(params, cfg.num_layers)
  gen = _generator(p, cfg, mesh_shape, layout)
  assert gen.layout == layout and gen.run_config.scan_layers == (layout == "scan")
  outs = gen.generate(PROMPTS, max_new_tokens=12, chunk=4)
  gdef = P.graphdef(cfg)
  # The whole forward, at one padded length (causal: padding on the right changes nothing before).
  forward = jax.jit(lambda params, row: P.apply(gdef, params, row[None])[0])
  for prompt, out in zip(PROMPTS, outs):
    ids = gen.encode(prompt)
    assert ids[0] == framing.BOS_ID and out.prompt_tokens == len(ids)
    for token in out.token_ids:
      row = np.zeros(cfg.max_length, np.int32)
      row[: len(ids)] = ids
      assert token == int(np.argmax(np.asarray(forward(p, row))[len(ids) - 1]))
      ids.append(token)
    assert out.finish_reason in ("length", "eos") and len(out.token_ids) <= 12


def test_greedy_equals_transformers_generate_on_the_export(params, tmp_path):
  out = hf_export.export_params(params, CFG, tmp_path / "hf")
  model = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
  ours = _generator(params).generate(PROMPTS, max_new_tokens=16)
  for prompt, mine in zip(PROMPTS, ours):
    ids = torch.as_tensor([framing.TRAINING.prompt(SP.encode(prompt))])
    with torch.no_grad():
      theirs = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=framing.EOS_ID,
        pad_token_id=framing.PAD_ID,
      )
    assert theirs[0, ids.shape[1] :].tolist() == mine.token_ids


def test_sampling_is_seeded_and_reproducible(params):
  gen = _generator(params, layout="scan")
  demo = sampling.SamplingConfig.demo(seed=3)
  a = gen.generate(PROMPTS, max_new_tokens=10, sampling_config=demo)
  b = gen.generate(PROMPTS, max_new_tokens=10, sampling_config=demo)
  c = gen.generate(
    PROMPTS, max_new_tokens=10, sampling_config=sampling.SamplingConfig(temperature=1.5, seed=4)
  )
  assert [x.token_ids for x in a] == [x.token_ids for x in b]
  assert [x.token_ids for x in a] != [x.token_ids for x in c]
  # the other layout samples the same tokens from the same seed
  unrolled = _generator(params, layout="unrolled").generate(
    PROMPTS, max_new_tokens=10, sampling_config=demo
  )
  assert [x.token_ids for x in unrolled] == [x.token_ids for x in a]


def test_decode_layout_auto_is_logged_and_a_wrong_name_is_refused(params, caplog):
  with caplog.at_level(logging.INFO):
    assert _generator(params).layout == "unrolled"
  assert "decode layout: unrolled (auto on cpu)" in caplog.text
  with pytest.raises(
    ValueError, match="decode layout 'stacked' is not one of auto, scan, unrolled"
  ):
    _generator(params, layout="stacked")


def _decode_programs(gen, batch=2, prompt_len=32, slots=64, steps=4):
  """The compiled prefill and decode-step programs of `gen` (the text XLA compiled them to)."""
  cfg = sampling.SamplingConfig()
  tokens = np.full((batch, prompt_len), framing.BOS_ID, np.int32)
  start = np.zeros(batch, np.int32)
  prefill = gen._prefill_fn(batch, prompt_len, slots, cfg)
  state = prefill(gen.params, tokens, start, jax.random.key(0))
  step = gen._chunk_fn(batch, slots, steps, cfg)
  texts = [
    f.lower(*args).compile().as_text()
    for f, args in (
      (prefill, (gen.params, tokens, start, jax.random.key(0))),
      (step, (gen.params, state)),
    )
  ]
  return texts


def test_the_cpu_decode_step_runs_without_ynnpack_unless_xla_flags_choose(
  params, caplog, monkeypatch
):
  """On CPU the decode step's products (a row per sequence) are compiled without XLA's YNNPACK
  library, which reads the weights at about 60% of Eigen's speed there; the prefill keeps it; an
  `xla_cpu_experimental_ynn_fusion_type` in the user's XLA_FLAGS is left to decide."""
  flags = os.environ.get("XLA_FLAGS", "")
  with caplog.at_level(logging.INFO):
    gen = _generator(params)
  assert "decode step on CPU: YNNPACK dots off" in caplog.text
  prefill, step = _decode_programs(gen)
  assert "__ynn_fusion" in prefill and "__ynn_fusion" not in step
  # the user's own setting (here: the library's default, YNNPACK dots) is what the step gets
  monkeypatch.setenv("XLA_FLAGS", f"{flags} --{generate.YNN_FLAG}=individual_dot")
  caplog.clear()
  with caplog.at_level(logging.INFO):
    gen = _generator(params)
  assert f"decode step on CPU: {generate.YNN_FLAG} as set in XLA_FLAGS" in caplog.text
  assert "__ynn_fusion" in _decode_programs(gen)[1]
  assert generate.decode_compiler_options("gpu") is None


@pytest.mark.parametrize("vocab", [300, 512])  # blocks of 128 (512) and the plain form (300)
def test_first_argmax_is_argmax_with_ties_and_nans(vocab):
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((7, vocab)).astype(np.float32)
  logits[1, [7, 40, 299]] = 9.0  # a tie across blocks: the first index wins
  logits[2, :] = -np.inf
  logits[3, [90, 5]] = np.nan  # argmax's answer with NaNs: the first NaN
  logits[4, [0, 1]] = logits[4].max() + 1  # a tie inside a block
  logits[5, [200, 290]] = [np.nan, 50.0]  # a NaN after a larger value in the same block
  logits[6, -1] = 30.0  # the last index
  np.testing.assert_array_equal(sampling.first_argmax(logits), np.argmax(logits, axis=-1))
  np.testing.assert_array_equal(sampling.first_argmax(logits), jax.numpy.argmax(logits, axis=-1))


def test_filters_match_transformers_logits_processors():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 50)).astype(np.float32) * 3
  ids = torch.as_tensor(rng.integers(0, 50, (3, 7)))
  seen = np.zeros((3, 50), bool)
  for row, toks in enumerate(ids.numpy()):
    seen[row, toks] = True
  t = torch.as_tensor(logits)
  want = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, t.clone()).numpy()
  np.testing.assert_allclose(sampling.apply_repetition_penalty(logits, seen, 1.3), want, rtol=1e-6)
  want = transformers.TopPLogitsWarper(0.8)(ids, t.clone()).numpy()
  np.testing.assert_array_equal(np.isinf(sampling.filter_top_p(logits, 0.8)), np.isinf(want))
  want = transformers.TopKLogitsWarper(5)(ids, t.clone()).numpy()
  np.testing.assert_array_equal(np.isinf(sampling.filter_top_k(logits, 5)), np.isinf(want))


def test_prompts_are_never_truncated_silently_and_stop_strings_cut(params, caplog):
  gen = _generator(params)
  long_prompt = list(range(3, 3 + CFG.max_length + 5))
  with pytest.raises(
    generate.PromptTooLongError, match="prompt 0 has 133 tokens but the model's context is 128"
  ):
    gen.generate([long_prompt], max_new_tokens=2)
  with caplog.at_level(logging.WARNING):
    [out] = gen.generate([long_prompt], max_new_tokens=2, truncate="left")
  assert "its first 5 tokens were dropped" in caplog.text
  assert out.prompt_tokens == CFG.max_length and out.finish_reason == "length"
  [free] = gen.generate([PROMPTS[0]], max_new_tokens=12)
  stop = free.text[3:5]
  [cut] = gen.generate([PROMPTS[0]], max_new_tokens=12, stop=[stop])
  assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  from polylm_jax.train import train_cli as cli

  workdir = tmp_path_factory.mktemp("gen") / "run"
  cli.main(
    [
      "--gin_file=gin_configs/quickstart.gin",
      f"--workdir={workdir}",
      "--gin_bindings=TrainerConfig.num_steps = 2",
      *SHORT_FLAGS,
      "--gin_bindings=TrainerConfig.eval_every = 0",
      *FEW_LANGUAGE_FLAGS,
    ]
  )
  return workdir


def test_generate_cli_from_a_workdir_and_from_its_export(trained_workdir, tmp_path, capsys):
  from polylm_jax.export import export_cli

  prompts = tmp_path / "in.jsonl"
  prompts.write_text(
    "\n".join(json.dumps({"id": i, "prompt": p}, ensure_ascii=False) for i, p in enumerate(PROMPTS))
  )
  assert (
    generate_cli.main(
      [
        f"--workdir={trained_workdir}",
        f"--prompts={prompts}",
        f"--output={tmp_path / 'a.jsonl'}",
        "--max_new_tokens=6",
      ]
    )
    == 0
  )
  records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
  assert [r["id"] for r in records] == [0, 1, 2]
  assert all(
    isinstance(r["completion"], str) and r["finish_reason"] in ("length", "eos") for r in records
  )
  assert export_cli.main([f"--workdir={trained_workdir}", f"--out={tmp_path / 'hf'}"]) == 0
  assert (
    generate_cli.main(
      [
        f"--hf_dir={tmp_path / 'hf'}",
        f"--prompts={prompts}",
        f"--output={tmp_path / 'b.jsonl'}",
        "--max_new_tokens=6",
      ]
    )
    == 0
  )
  assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
  capsys.readouterr()
  assert (
    generate_cli.main(
      [
        f"--workdir={trained_workdir}",
        f"--prompt={PROMPTS[0]}",
        "--max_new_tokens=4",
        "--demo_sampling",
        "--seed=1",
      ]
    )
    == 0
  )
  streamed = capsys.readouterr()
  assert "tokens]" in streamed.err
  assert generate_cli.main([f"--workdir={trained_workdir}", "--prompt=x" * 200]) == 2
  assert "context is 128" in capsys.readouterr().err


def test_chat_loop_and_a_model_without_its_tokenizer(
  trained_workdir, tmp_path, monkeypatch, capsys
):
  from polylm_jax.export import export_cli
  from polylm_jax.kernels import dispatch

  # What the console shows, in order: log lines and prompts. `auto`'s choice is logged before
  # the first prompt (as if this process had not traced these shapes yet), none within the chat.
  monkeypatch.setattr(dispatch, "_logged", set())
  shown: list[str] = []

  class Shown(logging.Handler):
    def emit(self, record):
      shown.append(f"{record.levelname} {record.getMessage()}")

  answers = iter(["Hello", "/reset", "How are you, my dear friend? " * 3, ""])

  def user(prompt=""):
    shown.append(prompt)
    return next(answers)

  monkeypatch.setattr("builtins.input", user)
  handler = Shown(logging.INFO)
  logging.getLogger().addHandler(handler)
  try:
    assert generate_cli.main([f"--workdir={trained_workdir}", "--chat", "--max_new_tokens=3"]) == 0
  finally:
    logging.getLogger().removeHandler(handler)
  first = shown.index("> ")
  assert any("attention_impl='auto' chose" in line for line in shown[:first]), shown
  assert all(line == "> " or line.startswith("WARNING") for line in shown[first:]), shown
  assert shown.count("> ") == 4
  assert "quit" in capsys.readouterr().err
  from polylm_jax import chat

  ids = chat.chat_prompt_ids(SP, [("Hi", "Hello!")], "Bye")
  assert ids == [1] + SP.encode("Hi\n\n") + SP.encode("Hello!") + [2] + SP.encode("Bye\n\n")
  assert export_cli.main([f"--workdir={trained_workdir}", f"--out={tmp_path / 'hf'}"]) == 0
  (tmp_path / "hf" / "tokenizer.model").unlink()
  assert generate_cli.main([f"--hf_dir={tmp_path / 'hf'}", "--prompt=x"]) == 2
  assert "no tokenizer.model" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_generate_arguments_are_checked_before_any_model_is_loaded(tmp_path, value, capsys):
  from polylm_jax.decode import generate_cli as cli

  with pytest.raises(SystemExit) as e:  # the workdir does not even exist: nothing was read
    cli.main([f"--workdir={tmp_path / 'none'}", "--prompt=Hi", f"--max_new_tokens={value}"])
  assert e.value.code == 2
  assert "argument --max_new_tokens:" in capsys.readouterr().err
