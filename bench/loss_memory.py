"""Memory and speed of the three LM-head losses (trainer/loss.py: full, chunked, tiled), measured
in one run against `full`:

1. the loss alone (its value and the gradients of hidden states and the tied embedding) for
   batch x length tokens: XLA's temporary buffers of the compiled function;
2. the whole train step of `--preset` on this machine (CPU by default): temporaries, and the
   median step time of `--reps` steps;
3. with `--tpu` (needs libtpu; nothing runs on a TPU): the whole train step of `polylm_1.7b` at
   batch 8 x 2048 compiled ahead of time for one v5p chip, per-device arguments + temporaries
   against 80 GB (an H100's memory) and the chip's 95 GB.

  python bench/loss_memory.py [--preset small --batch 8 --length 512] [--tpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2.0**30
IMPLS = {
  "full": dict(impl="full"),
  "chunked": dict(impl="chunked", chunk=128),
  "tiled": dict(impl="tiled"),  # the default tiles
}


def loss_only_temporaries(cfg, loss_config, n_tokens: int) -> int:
  from polylm_jax.trainer.loss import tiled_token_nll, token_nll

  h = jax.ShapeDtypeStruct((n_tokens, cfg.d_model), jnp.float32)
  w = jax.ShapeDtypeStruct((cfg.vocab_size, cfg.d_model), jnp.float32)
  y = jax.ShapeDtypeStruct((n_tokens,), jnp.int32)
  dt = cfg.compute_dtype

  def loss(h, w, y):
    if loss_config.impl == "tiled":
      return tiled_token_nll(h, w, y, loss_config.token_tile, loss_config.vocab_tile, dt).sum()
    logits = jnp.einsum("nd,vd->nv", h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
    return token_nll(logits, y).sum()

  if loss_config.impl == "chunked":
    return -1  # chunks are sequence positions of [B, T] rows: measured in the whole step only
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(h, w, y).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def train_step(cfg, loss_config, devices, batch: int, length: int):
  from polylm_jax import sharding
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer.step import TrainStep

  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), devices)
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=100,
    loss_config=loss_config,
  )
  batch_spec = step.abstract_batch(batch, length, languages=False)
  compiled = step.lower(step.abstract_state(), batch_spec).compile()
  return step, compiled


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--tpu", action="store_true")
  args = parser.parse_args()
  from polylm_jax import console

  console.choose_platform()  # the CPU, explicitly, on a machine without accelerators
  from polylm_jax.config import PRESETS
  from polylm_jax.trainer.loss import LossConfig

  cfg = PRESETS[args.preset].replace(dtype=args.dtype)
  n = args.batch * args.length
  print(
    f"{cfg.name}: vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.num_layers} layers, "
    f"batch {args.batch} x {args.length}, {cfg.dtype}, {jax.devices()[0].device_kind}"
  )
  rows = []
  for name, kw in IMPLS.items():
    lc = LossConfig(**kw)
    loss_temp = loss_only_temporaries(cfg, lc, n)
    step, compiled = train_step(cfg, lc, jax.devices()[:1], args.batch, args.length)
    mem = compiled.memory_analysis()
    state = step.init(0)
    rng = np.random.default_rng(0)
    batch = {
      "inputs": rng.integers(3, cfg.vocab_size, (args.batch, args.length)).astype(np.int32),
      "targets": rng.integers(3, cfg.vocab_size, (args.batch, args.length)).astype(np.int32),
      "weights": np.ones((args.batch, args.length), np.float32),
      "positions": np.tile(np.arange(args.length, dtype=np.int32), (args.batch, 1)),
      "segment_ids": np.ones((args.batch, args.length), np.int32),
    }
    placed = step.place_batch(batch)
    times = []
    for i in range(args.reps + 1):
      t = time.perf_counter()
      state, metrics = compiled(state, placed)
      jax.block_until_ready(metrics)
      if i:
        times.append(time.perf_counter() - t)
    rows.append((name, loss_temp, mem.temp_size_in_bytes, statistics.median(times)))
    print(name, rows[-1], flush=True)
  base = rows[0]
  print("\n| loss | loss alone: temporaries | train step: temporaries | step time |")
  print("|---|---|---|---|")
  for name, lt, st, t in rows:
    alone = "(per chunk)" if lt < 0 else f"{lt / 2**20:,.0f} MiB ({base[1] / lt:.1f}x less)"
    print(
      f"| {name} | {alone} | {st / 2**20:,.0f} MiB ({base[2] / st:.2f}x less) | "
      f"{t * 1e3:,.0f} ms ({t / base[3]:.3f}x) |"
    )
  if args.tpu:
    from polylm_jax.train.compile_cli import target_devices

    devices, _ = target_devices("v5p-8")  # compiled ahead of time, nothing runs on a TPU
    big = PRESETS["polylm_1.7b"].replace(remat_policy="full")
    print(f"\npolylm_1.7b, batch 8 x 2048, remat full, one {devices[0].device_kind} chip")
    print("| loss | arguments (state + batch) | temporaries | total | fits 80 GB |")
    print("|---|---|---|---|---|")
    for name, kw in IMPLS.items():
      lc = LossConfig(**kw)
      _, compiled = train_step(big, lc, devices[:1], 8, 2048)
      mem = compiled.memory_analysis()
      total = mem.argument_size_in_bytes + mem.temp_size_in_bytes
      print(
        f"| {name} | {mem.argument_size_in_bytes / GIB:.1f} GiB | "
        f"{mem.temp_size_in_bytes / GIB:.1f} GiB | {total / GIB:.1f} GiB | "
        f"{'yes' if total <= 80e9 else 'no'} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
