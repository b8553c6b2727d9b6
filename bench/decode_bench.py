"""Decode throughput: polylm-jax's KV-cache generation vs transformers `generate` on the export.

Same weights (random, exported to the GPT-2 layout), same prompts (random ids, one length), greedy,
the same number of new tokens on both sides (EOS disabled: each side is told to generate exactly
`--new` tokens), warm-up runs first, then the best of `--repeats` timed runs of each. Prints, per
side: generated tokens/s end to end, the time to the first token (prompt prefill + 1 token), and
the decode phase's tokens/s (the tokens after the first, over the time after it); and the ratios.

  python bench/decode_bench.py                      # `small` on CPU, float32, batch 1 and 16
  python bench/decode_bench.py --layouts scan,unrolled   # both decode layouts, same run
  python bench/decode_bench.py --preset polylm_1.7b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
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


def best_of(run, repeats: int):
  """The shortest of `repeats` timed runs (a loaded machine only ever adds time) and its output."""
  best, out = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = run()
    best = min(best, time.perf_counter() - start)
  return best, out


@dataclasses.dataclass
class Rates:
  """One side's figures for `rows` prompts: `first_s` generates 1 token (the prompt's prefill and
  the first token), `all_s` generates `new`; the decode phase is the difference."""

  rows: int
  new: int
  first_s: float
  all_s: float

  @property
  def end_to_end(self) -> float:  # generated tokens/s, prefill included
    return self.rows * self.new / self.all_s

  @property
  def decode(self) -> float:  # tokens/s after the first token
    return self.rows * (self.new - 1) / (self.all_s - self.first_s)


def timed(generate, rows: int, new: int, repeats: int) -> Rates:
  """`generate(n)` makes exactly n tokens per row; each length is run once to warm up."""
  generate(1), generate(new)
  return Rates(
    rows, new, best_of(lambda: generate(1), repeats)[0], best_of(lambda: generate(new), repeats)[0]
  )


def bench_jax(cfg, params, prompts: np.ndarray, new: int, layout: str, repeats: int) -> Rates:
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
  gen = generate.Generator(cfg, placed, _Ids(), mesh=mesh, layout=layout)
  del placed
  rows = [list(r) for r in prompts]

  def run(n):
    outs = gen.generate(rows, max_new_tokens=n, chunk=16)
    if any(len(o.token_ids) != n for o in outs):  # a row hit EOS: the counts would be off
      raise RuntimeError(f"a row stopped before {n} tokens: {[o.finish_reason for o in outs]}")

  return timed(run, len(rows), new, repeats)


def bench_torch(
  hf_dir: str, prompts: np.ndarray, new: int, device: str, dtype: str, repeats: int
) -> Rates:
  import torch
  import transformers

  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch_dtype).to(device)
  model.eval()
  ids = torch.as_tensor(prompts, device=device)

  def run(n):
    with torch.no_grad():
      out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=2,
      )
    if device == "cuda":
      torch.cuda.synchronize()
    assert out.shape[1] - ids.shape[1] == n

  return timed(run, ids.shape[0], new, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--device", default="cpu", help="torch device for transformers")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts")
  parser.add_argument(
    "--layouts", default="auto", help="decode layouts to time, comma-separated (scan, unrolled)"
  )
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
      ours = {
        layout: bench_jax(cfg, params, prompts, args.new, layout, args.repeats)
        for layout in args.layouts.split(",")
      }
      theirs = (
        bench_torch(hf_dir, prompts, args.new, args.device, args.dtype, args.repeats)
        if hf_dir
        else None
      )
      for name, r in [(f"polylm-jax ({k})", v) for k, v in ours.items()] + [
        ("transformers", theirs)
      ]:
        if r is None:
          continue
        line = (
          f"batch {batch:3d} {name:24s}: {r.end_to_end:8.1f} tokens/s end to end | first token "
          f"{r.first_s * 1e3:7.1f} ms | decode {r.decode:8.1f} tokens/s"
        )
        if theirs is not None and r is not theirs:
          line += (
            f" | ratio {r.end_to_end / theirs.end_to_end:.2f}x end to end, "
            f"{theirs.first_s / r.first_s:.2f}x first token, {r.decode / theirs.decode:.2f}x decode"
          )
        print(line, flush=True)


if __name__ == "__main__":
  main()
