"""Write parameters as a Hugging Face GPT-2 checkpoint directory, and read one back.

`export_params` streams tensor by tensor into safetensors shards (about one shard in memory),
casting to the chosen dtype; `import_params` reads a local directory (e.g. a downloaded
DAMO-NLP-MT/polylm-1.7b, or an earlier export) into this project's parameter tree.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import ml_dtypes
import numpy as np

from polylm_jax.config import ModelConfig
from polylm_jax.export import hf_layout, safetensors_io

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def prepare_output_dir(out_dir: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    if not overwrite:
      raise FileExistsError(f"output directory {out} exists and is not empty; pass overwrite "
                            f"(--overwrite) to replace it")
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  return out


def export_params(params, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
                  dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                  overwrite: bool = False) -> pathlib.Path:
  return export_source(hf_layout.TreeSource(params), cfg, out_dir, dtype=dtype,
                       max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def export_source(source, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
                  dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
                  overwrite: bool = False) -> pathlib.Path:
  """Writes config and weights from any parameter source (tree or checkpoint reader)."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
  out = prepare_output_dir(out_dir, overwrite)
  sources = hf_layout.hf_sources(source, cfg, EXPORT_DTYPES[dtype])
  safetensors_io.write_sharded(out, sources, max_shard_bytes)
  (out / "config.json").write_text(json.dumps(hf_layout.hf_config(cfg, dtype), indent=2) + "\n")
  (out / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n")
  return out


def config_from_hf(model_dir: str | pathlib.Path, **overrides) -> ModelConfig:
  """The ModelConfig of a GPT-2-layout checkpoint (config.json), refusing what the model lacks."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  c = json.loads(path.read_text())
  if c.get("model_type") != "gpt2":
    raise ValueError(f"{path}: model_type={c.get('model_type')!r}; only the GPT-2 layout "
                     f"(released PolyLM) is supported")
  act = c.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError(f"{path}: activation_function={act!r}; this model computes tanh-GeLU only")
  if not c.get("tie_word_embeddings", True):
    raise ValueError(f"{path}: tie_word_embeddings=false; PolyLM ties the LM head")
  d = c["n_embd"]
  fields = dict(name=path.parent.name, vocab_size=c["vocab_size"], max_length=c["n_positions"],
                num_layers=c["n_layer"], d_model=d, num_heads=c["n_head"],
                d_ff=c.get("n_inner") or 4 * d,
                layer_norm_eps=c.get("layer_norm_epsilon", 1e-5))
  fields.update(overrides)
  return ModelConfig(**fields)


def import_params(model_dir: str | pathlib.Path, cfg: ModelConfig, *, scanned: bool = True):
  model_dir = pathlib.Path(model_dir)
  tensors = dict(safetensors_io.read_dir(model_dir))
  return hf_layout.params_from_hf(tensors, cfg, scanned=scanned, source=str(model_dir))
