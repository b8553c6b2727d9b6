"""Write parameters as a Hugging Face GPT-2 checkpoint directory, and read one back.

`export_params` streams tensor by tensor into safetensors shards (about one shard in memory),
casting to the chosen dtype; `import_params` reads a local directory (e.g. a downloaded
DAMO-NLP-MT/polylm-1.7b, or an earlier export) into this project's parameter tree.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import ml_dtypes
import numpy as np

from polylm_jax.config import ModelConfig
from polylm_jax.export import hf_layout, safetensors_io
from polylm_jax.io import outputs, storage

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EXPORT_KIND = "Hugging Face export (config.json + safetensors)"


def looks_like_export(path: str | os.PathLike) -> bool:
  """An earlier export (local or gs://...): what `--overwrite` may replace."""
  file = lambda name: storage.isfile(storage.join(path, name))
  return file("config.json") and (file("model.safetensors") or file(safetensors_io.INDEX_NAME))


def export_params(
  params,
  cfg: ModelConfig,
  out_dir: str | pathlib.Path,
  *,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 2**30,
  overwrite: bool = False,
  allow_nonfinite: bool = False,
) -> pathlib.Path:
  """An in-memory parameter tree as a Hugging Face directory (built aside, swapped in whole)."""
  with outputs.staged_directory(
    out_dir, overwrite=overwrite, kind=EXPORT_KIND, looks_like=looks_like_export
  ) as staging:
    write_model_files(
      hf_layout.TreeSource(params),
      cfg,
      staging,
      dtype=dtype,
      max_shard_bytes=max_shard_bytes,
      allow_nonfinite=allow_nonfinite,
    )
  return pathlib.Path(out_dir)


def write_model_files(
  source,
  cfg: ModelConfig,
  out: pathlib.Path,
  *,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 2**30,
  allow_nonfinite: bool = False,
  generation: dict | None = None,
) -> None:
  """Writes config and weights from any parameter source (tree or checkpoint reader) into `out`
  (a staging directory: see outputs.staged_directory). Non-finite values are refused unless
  `allow_nonfinite`."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
  sources = hf_layout.hf_sources(source, cfg, EXPORT_DTYPES[dtype], allow_nonfinite=allow_nonfinite)
  safetensors_io.write_sharded(out, sources, max_shard_bytes)
  (out / "config.json").write_text(json.dumps(hf_layout.hf_config(cfg, dtype), indent=2) + "\n")
  (out / "generation_config.json").write_text(
    json.dumps(
      {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **(generation or {})}, indent=2
    )
    + "\n"
  )


# GPT-2 options that change what the model computes, with the value this model computes; a
# checkpoint with another value would load but give other logits, so it is refused.
_SAME_MATH = {
  "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
  "scale_attn_weights": (True,),  # scores scaled by 1/sqrt(head_dim)
  "scale_attn_by_inverse_layer_idx": (False,),  # no extra 1/(layer+1) scaling
  "add_cross_attention": (False,),
  "tie_word_embeddings": (True,),  # PolyLM ties the LM head
}
_DEFAULTS = {
  "activation_function": "gelu_new",
  "scale_attn_weights": True,
  "scale_attn_by_inverse_layer_idx": False,
  "add_cross_attention": False,
  "tie_word_embeddings": True,
}


def config_from_hf(model_dir: str | pathlib.Path, **overrides) -> ModelConfig:
  """The ModelConfig of a GPT-2-layout checkpoint (config.json), refusing what the model lacks."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found")
  try:
    c = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if c.get("model_type") != "gpt2":
    raise ValueError(
      f"{path}: model_type={c.get('model_type')!r}; only the GPT-2 layout "
      f"(released PolyLM) is supported"
    )
  for key, allowed in _SAME_MATH.items():
    value = c.get(key, _DEFAULTS[key])
    if value not in allowed:
      raise ValueError(
        f"{path}: {key}={json.dumps(value)}; this model computes "
        f"{key}={json.dumps(allowed[0])} only, so the weights would give other "
        f"outputs"
      )
  for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
    if c.get(key):
      logging.warning(
        "%s: %s=%s: dropout is not applied by this model (PolyLM trains without it)",
        path,
        key,
        c[key],
      )
  missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in c]
  if missing:
    raise ValueError(f"{path}: missing field(s) {missing}")
  d = c["n_embd"]
  fields = dict(
    name=path.parent.name,
    vocab_size=c["vocab_size"],
    max_length=c["n_positions"],
    num_layers=c["n_layer"],
    d_model=d,
    num_heads=c["n_head"],
    d_ff=c.get("n_inner") or 4 * d,
    layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
  )
  fields.update(overrides)
  try:
    return ModelConfig.from_dict(fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def import_params(
  model_dir: str | pathlib.Path,
  cfg: ModelConfig,
  *,
  scanned: bool = True,
  allow_nonfinite: bool = False,
):
  model_dir = pathlib.Path(model_dir)
  tensors = dict(safetensors_io.read_dir(model_dir))
  return hf_layout.params_from_hf(
    tensors, cfg, scanned=scanned, source=str(model_dir), allow_nonfinite=allow_nonfinite
  )
