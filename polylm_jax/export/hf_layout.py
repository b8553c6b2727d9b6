"""The mapping between this project's parameters and the Hugging Face GPT-2 layout of the released
PolyLM checkpoints (`GPT2LMHeadModel`, Conv1D weights stored [in, out], fused `c_attn`).

Every tensor is a reshape (no transposes): `qkv_kernel` [d, 3, heads, head_dim] is `c_attn.weight`
[d, 3d] with q, k, v and heads in GPT-2's order, `out_kernel` [heads, head_dim, d] is
`attn.c_proj.weight` [d, d]. The LM head is tied to `wte`, so no `lm_head.weight` is written.
"""

from __future__ import annotations

import numpy as np

from polylm_jax.config import ModelConfig

PREFIX = "transformer."

# The one table of the layout, read by export (plan) and import (params_from_hf) alike:
# (HF name inside block i, path in one unscanned block, HF shape, parameter shape).
_BLOCK = (
  ("ln_1.weight", ("ln_1", "scale"), lambda c: (c.d_model,), None),
  ("ln_1.bias", ("ln_1", "bias"), lambda c: (c.d_model,), None),
  (
    "attn.c_attn.weight",
    ("attn", "qkv_kernel"),
    lambda c: (c.d_model, 3 * c.d_model),
    lambda c: (c.d_model, 3, c.num_heads, c.head_dim),
  ),
  (
    "attn.c_attn.bias",
    ("attn", "qkv_bias"),
    lambda c: (3 * c.d_model,),
    lambda c: (3, c.num_heads, c.head_dim),
  ),
  (
    "attn.c_proj.weight",
    ("attn", "out_kernel"),
    lambda c: (c.d_model, c.d_model),
    lambda c: (c.num_heads, c.head_dim, c.d_model),
  ),
  ("attn.c_proj.bias", ("attn", "out_bias"), lambda c: (c.d_model,), None),
  ("ln_2.weight", ("ln_2", "scale"), lambda c: (c.d_model,), None),
  ("ln_2.bias", ("ln_2", "bias"), lambda c: (c.d_model,), None),
  ("mlp.c_fc.weight", ("mlp", "fc_kernel"), lambda c: (c.d_model, c.d_ff), None),
  ("mlp.c_fc.bias", ("mlp", "fc_bias"), lambda c: (c.d_ff,), None),
  ("mlp.c_proj.weight", ("mlp", "proj_kernel"), lambda c: (c.d_ff, c.d_model), None),
  ("mlp.c_proj.bias", ("mlp", "proj_bias"), lambda c: (c.d_model,), None),
)  # parameter shape None: the same as the HF tensor's
_TOP = (
  ("wte.weight", ("wte",), lambda c: (c.vocab_size, c.d_model), None),
  ("wpe.weight", ("wpe",), lambda c: (c.max_length, c.d_model), None),
  ("ln_f.weight", ("ln_f", "scale"), lambda c: (c.d_model,), None),
  ("ln_f.bias", ("ln_f", "bias"), lambda c: (c.d_model,), None),
)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  return {name: shape for name, _, _, shape in plan(cfg)}


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


class TreeSource:
  """Reads parameters from an in-memory tree (scanned or unscanned), like CheckpointReader."""

  def __init__(self, params):
    self.params = params
    self.scanned = 0 not in params["blocks"]

  def _leaf(self, path, layer):
    if layer is None:
      return _get(self.params, path)
    if self.scanned:
      return _get(self.params, path)[layer]
    return _get(self.params["blocks"][layer], path[1:])

  def read(self, path, layer=None, rows=None) -> np.ndarray:
    leaf = self._leaf(path, layer)
    return np.asarray(leaf if rows is None else leaf[rows])

  def param_shape(self, path, layer=None) -> tuple[int, ...]:
    return tuple(self._leaf(path, layer).shape)


def plan(cfg: ModelConfig):
  """(HF name, parameter path, layer or None, HF shape) for every tensor, in export order."""
  out: list[tuple[str, tuple[str, ...], int | None, tuple[int, ...]]] = [
    (PREFIX + name, path, None, shape(cfg)) for name, path, shape, _ in _TOP
  ]
  for i in range(cfg.num_layers):
    for name, path, shape, _ in _BLOCK:
      out.append((f"{PREFIX}h.{i}.{name}", ("blocks",) + path, i, shape(cfg)))
  return out


def _set(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def check_finite(name: str, values: np.ndarray, flag: str = "--allow_nonfinite") -> None:
  """Weights with NaN/Inf are a diverged model: refused, naming the tensor, unless forced."""
  if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    raise ValueError(
      f"tensor {name} has {bad} non-finite value(s) (NaN/Inf): the weights are "
      f"diverged; refusing them (pass {flag} to accept them anyway)"
    )


def hf_sources(
  source, cfg: ModelConfig, dtype, *, chunk_bytes: int = 256 * 2**20, allow_nonfinite: bool = False
):
  """TensorSources for the safetensors writer. Each tensor is read in chunks of whole parameter
  rows (about `chunk_bytes`) and cast, so host memory stays small whatever the tensor (the
  256000-row embedding included). `source` has read(path, layer, rows) and param_shape(path, layer)
  (TreeSource, or export.on_disk.CheckpointReader)."""
  from polylm_jax.export.safetensors_io import TensorSource

  sources = []
  for name, path, layer, shape in plan(cfg):
    param_shape = source.param_shape(path, layer)
    if int(np.prod(param_shape)) != int(np.prod(shape)):
      raise ValueError(
        f"{name}: parameter {'/'.join(map(str, path))} has shape {param_shape}, "
        f"which does not fit {shape} for ModelConfig({cfg.name})"
      )
    row_bytes = int(np.prod(param_shape[1:], dtype=np.int64)) * 4
    rows_per_chunk = max(1, chunk_bytes // max(row_bytes, 1))

    def chunks(
      path=path, layer=layer, shape=shape, lead=param_shape[0], step=rows_per_chunk, name=name
    ):
      if len(shape) == 1:
        part = source.read(path, layer)
        if not allow_nonfinite:
          check_finite(name, part)
        yield part.reshape(shape).astype(dtype)
        return
      for start in range(0, lead, step):
        part = source.read(path, layer, slice(start, min(start + step, lead)))
        if not allow_nonfinite:
          check_finite(name, part)
        yield part.reshape(-1, *shape[1:]).astype(dtype)

    sources.append(TensorSource(name, tuple(shape), np.dtype(dtype), chunks))
  return sources


def params_from_hf(
  tensors: dict[str, np.ndarray],
  cfg: ModelConfig,
  *,
  scanned: bool = True,
  source: str = "checkpoint",
  allow_nonfinite: bool = False,
):
  """This project's parameter tree from HF GPT-2 tensors; missing, unexpected or misshapen
  tensors are an error that names them."""
  expected = expected_shapes(cfg)
  # Tolerate checkpoints saved without the "transformer." prefix (GPT2Model) and the tied head.
  tensors = {
    (n if n.startswith(PREFIX) or n == "lm_head.weight" else PREFIX + n): v
    for n, v in tensors.items()
  }
  head = tensors.pop("lm_head.weight", None)
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(
    n
    for n in set(tensors) - set(expected)
    if not n.endswith(".attn.bias") and not n.endswith(".attn.masked_bias")
  )
  wrong = sorted(
    f"{n}: {tuple(tensors[n].shape)} != {expected[n]}"
    for n in set(expected) & set(tensors)
    if tuple(tensors[n].shape) != expected[n]
  )
  problems = []
  if missing:
    problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if unexpected:
    problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
  if wrong:
    problems.append(f"shape mismatches {wrong[:8]}")
  if problems:
    raise ValueError(f"{source} does not fit ModelConfig({cfg.name}): " + "; ".join(problems))
  if not allow_nonfinite:
    for n in sorted(expected):
      check_finite(f"{source}: {n}", np.asarray(tensors[n]))
  if head is not None and not np.array_equal(head, tensors[PREFIX + "wte.weight"]):
    raise ValueError(
      f"{source}: lm_head.weight differs from transformer.wte.weight, but PolyLM "
      f"ties the LM head to the token embedding"
    )
  f32 = lambda n: np.asarray(tensors[n], np.float32)

  def converted(name, hf_shape, param_shape):
    return f32(name).reshape((param_shape or hf_shape)(cfg))

  per_layer = {}
  for i in range(cfg.num_layers):
    layer: dict = {}
    for name, path, hf_shape, param_shape in _BLOCK:
      _set(layer, path, converted(f"{PREFIX}h.{i}.{name}", hf_shape, param_shape))
    per_layer[i] = layer
  if scanned:
    import jax

    blocks = jax.tree.map(lambda *xs: np.stack(xs), *[per_layer[i] for i in range(cfg.num_layers)])
  else:
    blocks = per_layer
  params: dict = {"blocks": blocks}
  for top_name, top_path, top_hf, top_param in _TOP:
    _set(params, top_path, converted(PREFIX + top_name, top_hf, top_param))
  return params


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """config.json for transformers' GPT2LMHeadModel, numerically identical to the JAX model."""
  return {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": cfg.vocab_size,
    "n_positions": cfg.max_length,
    "n_ctx": cfg.max_length,
    "n_embd": cfg.d_model,
    "n_layer": cfg.num_layers,
    "n_head": cfg.num_heads,
    "n_inner": cfg.d_ff,
    "activation_function": "gelu_new",  # tanh-approximated GeLU
    "layer_norm_epsilon": cfg.layer_norm_eps,
    "initializer_range": cfg.init_std,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "summary_first_dropout": 0.0,
    "scale_attn_weights": True,
    "tie_word_embeddings": True,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": dtype,
  }
