"""Decode throughput: polylm-jax's KV-cache generation vs transformers `generate` on the export.

Same weights (random, exported to the GPT-2 layout), same prompts (random ids, one length), greedy,
the same number of new tokens on both sides (EOS disabled: each side is told to generate exactly
`--new` tokens), warm-up run first, then timed. Prints generated tokens/s of each and the ratio.

  python bench/decode_bench.py                      # `small` on CPU, float32, batch 1 and 16
  python bench/decode_bench.py --preset polylm_1.7b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


class _Ids:
  """A stand-in tokenizer: the benchmark feeds ids, never text."""

  def encode(self, text):
    raise NotImplementedError

  def decode(self, ids):
    return ""


def bench_jax(cfg, params, prompts: np.ndarray, new: int) -> float:
  from polylm_jax import sharding
  from polylm_jax.decode import generate
  from polylm_jax.model import params as P

  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  placed = jax.device_put(
    params,
    sharding.tree_shardings(
      P.logical_axes(cfg), P.abstract_params(cfg), mesh, sharding.DEFAULT_RULES
    ),
  )
  gen = generate.Generator(cfg, placed, _Ids(), mesh=mesh)
  eos = generate.framing_lib.EOS_ID
  rows = [list(r) for r in prompts]
  gen.generate(rows, max_new_tokens=new, chunk=16)  # compile
  start = time.perf_counter()
  outs = gen.generate(rows, max_new_tokens=new, chunk=16)
  took = time.perf_counter() - start
  made = sum(len(o.token_ids) for o in outs)
  if any(o.finish_reason == "eos" for o in outs):
    print(f"  (note: {sum(o.finish_reason == 'eos' for o in outs)} rows hit EOS id {eos})")
  return made / took


def bench_torch(hf_dir: str, prompts: np.ndarray, new: int, device: str, dtype: str) -> float:
  import torch
  import transformers

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch_dtype).to(device)
  model.eval()
  ids = torch.as_tensor(prompts, device=device)

  def run():
    with torch.no_grad():
      out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
      )
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  run()
  start = time.perf_counter()
  out = run()
  took = time.perf_counter() - start
  return (out.shape[1] - ids.shape[1]) * ids.shape[0] / took


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--device", default="cpu", help="torch device for transformers")
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args()
  from polylm_jax.config import PRESETS
  from polylm_jax.export import hf_export
  from polylm_jax.model import params as P

  cfg = PRESETS[args.preset].replace(dtype=args.dtype, attention_impl="auto")
  params = jax.device_get(P.init_params(cfg, 0))
  print(
    f"decode benchmark: {cfg.name} ({args.dtype}), prompt {args.prompt_len} tokens, "
    f"{args.new} new tokens, greedy; jax {jax.__version__} on {jax.devices()[0].device_kind}; "
    f"CPU {cpu_name()} ({os.cpu_count()} cores)"
  )
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = (
      None
      if args.skip_torch
      else str(hf_export.export_params(params, cfg, f"{tmp}/hf", dtype=args.dtype))
    )
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batches.split(",")):
      prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
      prompts[:, 0] = 1  # BOS
      ours = bench_jax(cfg, params, prompts, args.new)
      line = f"batch {batch:3d}: polylm-jax {ours:9.1f} tokens/s"
      if hf_dir:
        theirs = bench_torch(hf_dir, prompts, args.new, args.device, args.dtype)
        line += f" | transformers {theirs:9.1f} tokens/s | ratio {ours / theirs:.2f}x"
      print(line, flush=True)


if __name__ == "__main__":
  main()
