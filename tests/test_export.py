"""Parameters <-> Hugging Face GPT-2 layout: transformers loads the export with no custom code and
computes the same logits; imports are exact; bad checkpoints name the tensor at fault."""

import json

import jax
import numpy as np
import pytest
import torch  # requirements-test.txt: the export checks load the export with transformers
import transformers

from polylm_jax.config import PRESETS
from polylm_jax.export import hf_export, safetensors_io
from polylm_jax.model import params as P

CFG = PRESETS["tiny"].replace(num_layers=3)
TOKENS = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 24))


def _jax_logits(params, cfg=CFG):
  return np.asarray(P.apply(P.graphdef(cfg), params, TOKENS))


def _hf_logits(model_dir, dtype=torch.float32):
  model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
  params = P.init_params(CFG, 3)
  params = jax.tree.map(
    lambda x: x + 0.01 * np.random.default_rng(1).normal(size=x.shape).astype(np.float32), params
  )  # non-trivial biases and norms
  out = hf_export.export_params(params, CFG, tmp_path / "hf")
  assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu_new"
  np.testing.assert_allclose(_hf_logits(out), _jax_logits(params), atol=1e-4, rtol=0)
  auto = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(auto).__name__ == "GPT2LMHeadModel"


def test_verify_compares_rows_of_any_length_and_catches_a_changed_weight(tmp_path):
  """--verify's comparison (rows right-padded and run a few at a time): rows of other lengths and
  a last, partial call each match transformers; a changed weight shows on every row."""
  from polylm_jax.export.verify import logits_differences

  params = P.init_params(CFG, 6)
  out = hf_export.export_params(params, CFG, tmp_path / "hf")
  rows = [TOKENS[0, :3].tolist(), TOKENS[1].tolist(), TOKENS[0, :11].tolist()]
  diffs = logits_differences(out, CFG, params, rows, rows_per_call=2)
  assert len(diffs) == 3 and max(diffs) < 1e-4, diffs
  changed = jax.tree.map(np.array, jax.device_get(params))
  changed["ln_f"]["bias"] += 0.5
  assert min(logits_differences(out, CFG, changed, rows, rows_per_call=2)) > 1e-2


def test_multi_shard_and_bf16_exports(tmp_path):
  params = P.init_params(CFG, 4)
  sharded = hf_export.export_params(params, CFG, tmp_path / "sharded", max_shard_bytes=200_000)
  index = json.loads((sharded / safetensors_io.INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 2
  np.testing.assert_allclose(_hf_logits(sharded), _jax_logits(params), atol=1e-4, rtol=0)
  bf16 = hf_export.export_params(params, CFG, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
  got = _hf_logits(bf16, torch.bfloat16)
  assert np.max(np.abs(got - _jax_logits(params))) < 5e-2


def test_round_trip_is_exact_and_import_matches_a_transformers_model(tmp_path):
  params = P.init_params(CFG, 5)
  out = hf_export.export_params(params, CFG, tmp_path / "a")
  back = hf_export.import_params(out, CFG)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(params))
  unscanned = hf_export.import_params(out, CFG, scanned=False)
  jax.tree.map(
    np.testing.assert_array_equal, P.unscanned_to_scan(unscanned), jax.device_get(params)
  )
  # A GPT2LMHeadModel built locally with random weights: importing it reproduces its logits.
  torch.manual_seed(0)
  hf_cfg = transformers.GPT2Config(
    **{
      k: v
      for k, v in hf_export.hf_layout.hf_config(CFG).items()
      if k not in ("architectures", "model_type", "torch_dtype")
    }
  )
  model = transformers.GPT2LMHeadModel(hf_cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf_random")
  cfg = hf_export.config_from_hf(tmp_path / "hf_random", dtype="float32")
  imported = hf_export.import_params(tmp_path / "hf_random", cfg)
  with torch.no_grad():
    want = model(torch.as_tensor(TOKENS)).logits.numpy()
  np.testing.assert_allclose(_jax_logits(imported, cfg), want, atol=1e-4, rtol=0)


def test_bad_checkpoints_name_the_tensor(tmp_path):
  params = P.init_params(CFG, 6)
  out = hf_export.export_params(params, CFG, tmp_path / "x")
  tensors = dict(safetensors_io.read_dir(out))
  del tensors["transformer.h.1.mlp.c_fc.bias"]
  tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((3, 3), np.float32)
  tensors["transformer.h.9.extra"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as e:
    hf_export.hf_layout.params_from_hf(tensors, CFG, source="ckpt")
  msg = str(e.value)
  assert "missing tensors ['transformer.h.1.mlp.c_fc.bias']" in msg
  assert "unexpected tensors ['transformer.h.9.extra']" in msg
  assert "transformer.h.0.attn.c_proj.weight: (3, 3) != (64, 64)" in msg
  with pytest.raises(FileExistsError, match="pass overwrite"):
    hf_export.export_params(params, CFG, out)
  hf_export.export_params(params, CFG, out, overwrite=True)
  with pytest.raises(ValueError, match="export dtype 'int8'"):
    hf_export.export_params(params, CFG, tmp_path / "y", dtype="int8")


def test_configs_and_indexes_that_cannot_be_trusted_are_refused(tmp_path):
  out = hf_export.export_params(P.init_params(CFG, 7), CFG, tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  for key, value in (
    ("scale_attn_by_inverse_layer_idx", True),
    ("scale_attn_weights", False),
    ("add_cross_attention", True),
    ("activation_function", "relu"),
    ("tie_word_embeddings", False),
  ):
    (out / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    with pytest.raises(ValueError, match=f"{key}={json.dumps(value)}; this model computes"):
      hf_export.config_from_hf(out)
  (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
  with pytest.raises(ValueError, match=r"config.json: missing field\(s\) \['n_head'\]"):
    hf_export.config_from_hf(out)
  (out / "config.json").write_text(json.dumps(config))
  (out / safetensors_io.INDEX_NAME).write_text(
    json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/passwd"}})
  )
  with pytest.raises(ValueError, match=r"shard file '../../etc/passwd' is not a file inside"):
    hf_export.import_params(out, CFG)
