"""Which attention implementation runs, and how it runs inside a sharded model.

`attention_impl`:
  xla         the reference (plain XLA, materialises the scores)
  pallas_gpu  this project's Pallas/Triton flash kernel (CUDA GPUs)
  pallas_tpu  this project's Pallas/Mosaic flash kernel (TPUs)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn"); segment ids are honoured by
              passing them as a mask (cuDNN then adds a [B, 1, T, T] bias: correct, not cheap)
  auto        per platform and rows: pallas_tpu on TPU; on GPU pallas_gpu for packed rows (segment
              ids) and cudnn for unpacked bf16/fp16 rows (each measured faster there); xla on
              CPU; logged once per shape
An explicit choice that cannot serve the platform, dtype or shape raises; nothing falls back.

Kernels run under `jax.shard_map` over the batch and head mesh axes when a mesh is active
(Mosaic kernels cannot be partitioned automatically, and a per-device kernel call is what we want
for Triton too). Sequences must not be split across devices.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from polylm_jax import sharding
from polylm_jax.config import ATTENTION_IMPLS as IMPLS  # the one list (ModelConfig checks it)
from polylm_jax.kernels.common import BlockSizes, check_inputs, segment_ids_or_one

_PLATFORM_OF = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "cudnn": "gpu"}
_logged: set[tuple] = set()


def current_platform() -> str:
  active = sharding.active_mesh()
  if active is not None:
    return active[0].devices.flat[0].platform
  return jax.default_backend()


def _auto_gpu(q, packed: bool) -> tuple[str, str]:
  """On a GPU, the kernel measured faster for these rows (docs/kernels.md, H100, bf16): ours on
  packed rows (1.54-1.59x cuDNN: it skips other documents' key blocks), cuDNN's on rows of one
  sequence each (ours is 0.76-0.84x there), where cuDNN can take them."""
  if packed:
    return "pallas_gpu", "packed rows (segment ids): the Pallas kernel skips other documents"
  if q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0:
    return "cudnn", "unpacked rows: cuDNN's flash kernel is faster there"
  return "pallas_gpu", f"unpacked rows, but cuDNN needs bf16/fp16 and head_dim <= 128 ({q.dtype})"


def resolve(
  impl: str,
  q,
  *,
  packed: bool = True,
  interpret: bool = False,
  blocks: BlockSizes = BlockSizes(),
) -> str:
  """The implementation that will run: `auto` resolved, explicit choices checked. `packed`: the
  rows hold several documents (segment ids given), as in training."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}")
  platform = current_platform()
  if impl == "auto":
    chosen = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform, "xla")
    reason = "the platform's kernel"
    if platform == "gpu":
      chosen, reason = _auto_gpu(q, packed)
    if chosen.startswith("pallas"):
      try:  # shapes the kernel cannot take (head_dim, a length its blocks do not divide): xla
        check_inputs(q, q, q, None, blocks, impl=chosen)
      except ValueError as e:
        chosen, reason = "xla", str(e)
    key = (platform, chosen, q.shape[1], q.shape[-1], packed)
    if key not in _logged:
      _logged.add(key)
      logging.info(
        "attention_impl='auto' chose %r on platform %r (length %d, head_dim %d, %s): %s",
        chosen,
        platform,
        q.shape[1],
        q.shape[-1],
        "packed" if packed else "unpacked",
        reason,
      )
    return chosen
  needed = _PLATFORM_OF.get(impl)
  if needed and platform != needed and not (interpret and impl.startswith("pallas")):
    hint = (
      " (set ModelConfig.attention_interpret=True to run the kernel in the Pallas "
      "interpreter, e.g. in tests)"
      if impl.startswith("pallas")
      else ""
    )
    raise ValueError(
      f"attention_impl={impl!r} needs a {needed.upper()} but this computation runs "
      f"on {platform!r}{hint}"
    )
  return impl


def _cudnn(q, k, v, segment_ids, *, causal):
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(
      f"attention_impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}; set "
      f"ModelConfig.dtype='bfloat16' or use another attention_impl"
    )
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")


def kernel_fn(impl: str, *, causal: bool, blocks: BlockSizes, interpret: bool):
  """A per-device attention function f(q, k, v, segment_ids) for a resolved non-xla impl."""
  if impl == "pallas_gpu":
    from polylm_jax.kernels import flash_gpu

    return functools.partial(
      flash_gpu.flash_attention, causal=causal, blocks=blocks, interpret=interpret
    )
  if impl == "pallas_tpu":
    from polylm_jax.kernels import flash_tpu

    return functools.partial(
      flash_tpu.flash_attention, causal=causal, blocks=blocks, interpret=interpret
    )
  if impl == "cudnn":
    return functools.partial(_cudnn, causal=causal)
  raise ValueError(f"no kernel for attention_impl={impl!r}")


def run_kernel(
  impl: str, q, k, v, segment_ids, *, causal: bool, blocks: BlockSizes, interpret: bool
):
  if impl.startswith("pallas"):
    check_inputs(q, k, v, segment_ids, blocks, impl=impl)  # fail at the call, before shard_map
  fn = kernel_fn(impl, causal=causal, blocks=blocks, interpret=interpret)
  segment_ids = segment_ids_or_one(q, segment_ids)
  active = sharding.active_mesh()
  if active is None:
    return fn(q, k, v, segment_ids)
  mesh, rules = active
  qkv_spec = sharding.logical_to_mesh_spec(sharding.BTHK, rules)
  seg_spec = sharding.logical_to_mesh_spec(sharding.ROWS, rules)
  if qkv_spec[1] is not None or qkv_spec[3] is not None:
    raise ValueError(
      f"attention_impl={impl!r} needs whole sequences and head dims per device, "
      f"but the rules shard them ({qkv_spec}); map activation_length and "
      f"activation_kv to None"
    )
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
    out_specs=qkv_spec,
    check_vma=False,
  )(q, k, v, segment_ids)
