"""Train-step throughput on CPU: polylm-jax vs transformers' GPT2LMHeadModel + torch AdamW.

Same shape (the `small` preset: 6 layers, d 512, 8 heads, vocab 32000), same batch (8 x 512),
float32 on both sides, full steps (forward, backward, clipping, AdamW update). Prints tokens/s of
each, their ratio, and this project's MFU against a matmul peak measured in the same run.

  pip install -r requirements-bench.txt
  python bench/train_step_cpu.py [--steps 10] [--batch 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def measured_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an XLA float32 n^3 matmul on this machine (best of `reps`)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def bench_jax(cfg, batch: int, seq: int, steps: int, warmup: int) -> float:
  return jax_steps(cfg, batch, seq, steps, warmup)[0]


def jax_steps(cfg, batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
  """Tokens/s of `steps` timed train steps on one batch of random tokens, and the last loss."""
  from polylm_jax import sharding
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer.step import TrainStep

  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10_000,
  )
  state = step.init(0)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  data = step.place_batch(
    {
      "inputs": toks[:, :-1],
      "targets": toks[:, 1:],
      "weights": np.ones((batch, seq), np.float32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
      "segment_ids": np.ones((batch, seq), np.int32),
    }
  )
  for _ in range(warmup):
    state, m = step(state, data)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, data)
  jax.block_until_ready(m)
  return batch * seq * steps / (time.perf_counter() - t), float(m["loss"])


def bench_torch(cfg, batch: int, seq: int, steps: int, warmup: int) -> float:
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel

  torch.manual_seed(0)
  model = GPT2LMHeadModel(
    GPT2Config(
      vocab_size=cfg.vocab_size,
      n_positions=cfg.max_length,
      n_embd=cfg.d_model,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.d_ff,
      activation_function="gelu_new",
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      layer_norm_epsilon=cfg.layer_norm_eps,
      tie_word_embeddings=True,
      bos_token_id=1,
      eos_token_id=2,
    )
  )
  model.train()
  opt = torch.optim.AdamW(
    model.parameters(), lr=6e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4
  )
  toks = torch.randint(3, cfg.vocab_size, (batch, seq))

  def one():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=toks, labels=toks).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  for _ in range(warmup):
    one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return batch * seq * steps / (time.perf_counter() - t)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--scan_layers", type=int, default=1)
  args = parser.parse_args()
  from polylm_jax.config import PRESETS
  from polylm_jax.trainer.flops import train_flops_per_token

  cfg = PRESETS["small"].replace(dtype="float32", scan_layers=bool(args.scan_layers))
  import torch

  print(
    f"machine: {platform.machine()} {os.cpu_count()} cores; jax {jax.__version__}, "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
  )
  print(
    f"shape: small preset, {cfg.num_layers} layers, d {cfg.d_model}, {cfg.num_heads} heads, "
    f"vocab {cfg.vocab_size}, batch {args.batch} x {args.seq}, float32"
  )
  peak = measured_matmul_peak()
  jax_tps = bench_jax(cfg, args.batch, args.seq, args.steps, args.warmup)
  torch_tps = bench_torch(cfg, args.batch, args.seq, args.steps, args.warmup)
  mfu = train_flops_per_token(cfg, args.seq) * jax_tps / peak
  print(f"measured matmul peak (XLA f32 2048^3): {peak / 1e9:.1f} GFLOP/s")
  print(f"polylm-jax     : {jax_tps:9.1f} tokens/s  (MFU vs measured peak {mfu:.1%})")
  print(f"transformers   : {torch_tps:9.1f} tokens/s  (GPT2LMHeadModel + torch AdamW)")
  print(f"ratio jax/torch: {jax_tps / torch_tps:.2f}x")


if __name__ == "__main__":
  main()
