"""The one-command GPU check for a lent GPU (H100/H200), within about 8 minutes:

1. correctness of this project's Pallas GPU kernel compiled (not interpreted): forward and
   dq/dk/dv against the XLA reference, float32 and bfloat16, packed rows; packed-segment
   isolation for pallas_gpu and cudnn (an implementation that ignored segment ids fails here);
2. attention TFLOP/s, forward and forward+backward, at PolyLM shapes (16 x 2048, heads 16 and 40,
   head_dim 128, causal, packed and unpacked) for xla, cudnn, pallas_gpu and, when present, JAX's
   own jax.experimental.pallas.ops.gpu.attention, with the ratios the kernel issue asks for;
3. train-step tokens/s and MFU of the polylm_1.7b config at length 2048 on this GPU.

Needs only jax/flax/optax (no seqio, tensorflow or gin). `--smoke` runs every section with tiny
shapes on CPU in the Pallas interpreter (what CI runs, to keep this script working).

  bash bench/gpu_check.sh            # on the GPU
  python bench/gpu_check.py --smoke  # anywhere
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from polylm_jax.kernels import flash_gpu
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model.attention import attention, xla_attention


def timed(fn, *args, reps: int) -> float:
  """Median seconds per call of a jitted fn (after one compile+warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def packed_segments(batch: int, length: int, rng) -> np.ndarray:
  """Rows of random-length documents (length/32 .. length/2 tokens) and a padded tail."""
  seg = np.zeros((batch, length), np.int32)
  shortest = max(length // 32, 2)
  for b in range(batch):
    pos, s = 0, 1
    while pos < length - shortest:
      n = int(rng.integers(shortest, length // 2))
      seg[b, pos : pos + n] = s
      pos, s = pos + n, s + 1
  return seg


def rel_err(x, y) -> float:
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def correctness(args) -> bool:
  print("== 1. correctness (compiled kernels vs XLA reference) ==")
  rng = np.random.default_rng(0)
  b, t, h, d = (2, 64, 2, 64) if args.smoke else (2, 1024, 4, 128)
  seg = jnp.asarray(
    packed_segments(b, t, rng)
    if not args.smoke
    else np.array([[1] * 20 + [2] * 30 + [3] * 10 + [0] * 4, [1] * 64], np.int32)
  )
  blocks = (
    BlockSizes(16, 32)
    if args.smoke
    else BlockSizes(args.block_q, args.block_k, args.bwd_block_q, args.bwd_block_k)
  )
  ok = True
  # float32 inputs: on a GPU both the kernel's and XLA's float32 dots run on TF32 tensor cores
  # by default (10-bit mantissa), so compiled-kernel errors of ~1e-4 are expected there; the
  # interpreter (CPU) computes in true float32.
  f32_tol = 1e-5 if args.smoke else 2e-3
  for dtype, tol in ((jnp.float32, f32_tol), (jnp.bfloat16, 2e-2)):
    q, k, v, do = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in range(4))
    kern = jax.jit(
      lambda q, k, v: flash_gpu.flash_attention(q, k, v, seg, blocks=blocks, interpret=args.smoke)
    )
    f32 = lambda x: x.astype(jnp.float32)
    ref = jax.jit(lambda q, k, v: xla_attention(f32(q), f32(k), f32(v), seg))
    out, vjp = jax.vjp(kern, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    errs = [rel_err(out, ref_out)] + [rel_err(g, w) for g, w in zip(vjp(do), ref_vjp(f32(do)))]
    passed = max(errs) <= tol
    ok &= passed
    print(
      f"pallas_gpu {jnp.dtype(dtype).name:8s} rel err o/dq/dk/dv "
      f"{' '.join(f'{e:.1e}' for e in errs)}  (<= {tol:g}) {'PASS' if passed else 'FAIL'}"
    )
  impls = ["pallas_gpu"] + ([] if args.smoke else ["cudnn"])
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for _ in range(3))
  first = np.asarray(seg) == 1
  noise = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)
  for impl in impls:
    run = jax.jit(
      lambda q, k, v, impl=impl: attention(
        q, k, v, seg, impl=impl, interpret=args.smoke, blocks=blocks
      )
    )
    base = np.asarray(run(q, k, v), np.float32)
    bumped = [jnp.where(jnp.asarray(first)[:, :, None, None], x + noise, x) for x in (q, k, v)]
    out = np.asarray(run(*bumped), np.float32)
    passed = np.array_equal(out[~first], base[~first])
    ok &= passed
    print(
      f"{impl:10s} isolation: other documents unchanged when one is perturbed: "
      f"{'PASS' if passed else 'FAIL'}"
    )
  return ok


def attention_table(args) -> None:
  print(
    "\n== 2. attention TFLOP/s (causal; fwd+bwd counted as 3.5x fwd, FlashAttention-2 style) =="
  )
  rng = np.random.default_rng(1)
  if args.smoke:
    shapes, reps = [(2, 64, 2, 64)], 1
  else:
    shapes, reps = [(16, 2048, 16, 128), (16, 2048, 40, 128)], args.reps
  blocks = (
    BlockSizes(16, 32)
    if args.smoke
    else BlockSizes(args.block_q, args.block_k, args.bwd_block_q, args.bwd_block_k)
  )
  impls = {
    "xla": lambda q, k, v, s: xla_attention(q, k, v, s),
    "pallas_gpu": lambda q, k, v, s: flash_gpu.flash_attention(
      q, k, v, s, blocks=blocks, interpret=args.smoke
    ),
  }
  if not args.smoke:
    impls["cudnn"] = lambda q, k, v, s: attention(q, k, v, s, impl="cudnn")
    try:
      from jax.experimental.pallas.ops.gpu import attention as jax_ref

      impls["jax_pallas_ops"] = lambda q, k, v, s: jax_ref.mha(
        q, k, v, s, sm_scale=q.shape[-1] ** -0.5, causal=True
      )
    except ImportError as e:
      print(f"(jax.experimental.pallas.ops.gpu.attention not present: {e})")
  print(f"{'B x T':>10} {'H':>3} {'packed':>6} {'impl':>15} {'fwd TF/s':>9} {'fwd+bwd TF/s':>13}")
  for b, t, h, d in shapes:
    fwd_flops = 4 * b * h * t * t * d / 2
    for packed in (False, True):
      seg = jnp.asarray(packed_segments(b, t, rng) if packed else np.ones((b, t), np.int32))
      q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for _ in range(3))
      row = {}
      for name, fn in impls.items():
        fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, seg))
        both = jax.jit(
          jax.grad(
            lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, seg).astype(jnp.float32)), argnums=(0, 1, 2)
          )
        )
        try:
          tf = fwd_flops / timed(fwd, q, k, v, reps=reps) / 1e12
          tb = 3.5 * fwd_flops / timed(both, q, k, v, reps=reps) / 1e12
        except Exception as e:  # report, keep measuring the others
          print(
            f"{b}x{t:>5} {h:>3} {str(packed):>6} {name:>15}  failed: {type(e).__name__}: "
            f"{str(e)[:200]}"
          )
          continue
        row[name] = tb
        print(f"{b}x{t:>5} {h:>3} {str(packed):>6} {name:>15} {tf:9.1f} {tb:13.1f}")
      if "pallas_gpu" in row:
        for base in ("cudnn", "xla"):
          if base in row:
            print(f"{'':>27} pallas_gpu / {base} (fwd+bwd): {row['pallas_gpu'] / row[base]:.2f}x")


def train_step_mfu(args) -> bool:
  print("\n== 3. train step of the polylm_1.7b config ==")
  from polylm_jax.config import PRESETS

  impls = args.impl or ("pallas_gpu" if args.smoke else "pallas_gpu,cudnn")
  ok = True
  remats = ["none"] if args.smoke else args.remat.split(",")
  for impl, remat in itertools.product(impls.split(","), remats):
    if args.smoke:
      cfg = PRESETS["tiny"].replace(attention_impl=impl, attention_interpret=True)
      blocks = BlockSizes(16, 16)
      batch, length, reps = 2, 64, 1
    else:
      cfg = PRESETS["polylm_1.7b"].replace(
        num_layers=args.layers,
        attention_impl=impl,
        remat_policy=remat,
      )
      blocks = BlockSizes(args.block_q, args.block_k, args.bwd_block_q, args.bwd_block_k)
      batch, length, reps = args.batch, 2048, args.train_reps
    try:
      one_train_step(args, cfg, blocks, batch, length, reps)
    except Exception:  # report, then measure the next implementation
      traceback.print_exc()
      ok = False
  return ok


def one_train_step(args, cfg, blocks, batch: int, length: int, reps: int) -> None:
  from polylm_jax import sharding
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer import flops
  from polylm_jax.trainer.loss import LossConfig
  from polylm_jax.trainer.step import TrainStep

  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  loss = LossConfig(
    impl=args.loss,
    chunk=args.loss_chunk,
    token_tile=args.loss_token_tile,
    vocab_tile=args.loss_vocab_tile,
  )
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=1000,
    loss_config=loss,
    attention_blocks=blocks,
  )
  state = step.init(0)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
  seg = (
    packed_segments(batch, length, rng) if not args.smoke else np.ones((batch, length), np.int32)
  )
  pos = np.zeros_like(seg)
  for r in range(batch):
    for s in np.unique(seg[r]):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  data = step.place_batch(
    {
      "inputs": toks[:, :-1],
      "targets": toks[:, 1:],
      "weights": (seg > 0).astype(np.float32),
      "positions": pos,
      "segment_ids": seg,
    }
  )
  t = time.perf_counter()
  state, m = step(state, data)  # compile
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(reps):
    state, m = step(state, data)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / reps
  tokens_per_s = batch * length / dt
  device = jax.devices()[0]
  peak = flops.peak_flops_per_device(device, args.peak_flops)
  loss_label = args.loss + (
    f" {args.loss_token_tile}x{args.loss_vocab_tile}" if args.loss == "tiled" else ""
  )
  mfu = flops.train_flops_per_token(cfg, length) * tokens_per_s / peak if peak else float("nan")
  print(
    f"{cfg.name}: {cfg.num_layers} layers (released: 24), batch {batch} x {length}, "
    f"attention {cfg.attention_impl}, remat {cfg.remat_policy}, device {device.device_kind}, "
    f"blocks fwd {blocks.block_q}x{blocks.block_k} bwd "
    f"{blocks.bwd_block_q or 0}x{blocks.bwd_block_k or 0}, loss {loss_label}, "
    f"first step (compile) {compile_s:.0f} s"
  )
  print(
    f"step {dt * 1e3:.1f} ms, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, loss "
    f"{float(m['loss']):.3f}",
    flush=True,
  )
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")


def block_sweep(args) -> None:
  """fwd+bwd TFLOP/s of pallas_gpu over block sizes and Triton warps/stages (unpacked, 16 heads),
  to choose the defaults; cuDNN measured in the same run as the yardstick."""
  print("\n== 4. pallas_gpu block / warps / stages sweep (16 x 2048, 16 heads, causal) ==")
  from jax.experimental.pallas import triton as plgpu

  rng = np.random.default_rng(2)
  b, t, h, d = (2, 64, 2, 64) if args.smoke else (16, 2048, 16, 128)
  reps = 1 if args.smoke else args.reps
  fwd_flops = 4 * b * h * t * t * d / 2
  seg = jnp.ones((b, t), jnp.int32)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.bfloat16) for _ in range(3))

  def measure(fn):
    both = jax.jit(
      jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    )
    fwd = jax.jit(fn)
    return (
      fwd_flops / timed(fwd, q, k, v, reps=reps) / 1e12,
      3.5 * fwd_flops / timed(both, q, k, v, reps=reps) / 1e12,
    )

  if not args.smoke:
    tf, tb = measure(lambda q, k, v: attention(q, k, v, seg, impl="cudnn"))
    print(f"cudnn: fwd {tf:.1f}  fwd+bwd {tb:.1f} TF/s")
  configs = (
    [(16, 32, 4, 2)]
    if args.smoke
    else [
      (bq, bk, w, st)
      for bq, bk in ((64, 64), (128, 64), (128, 128), (64, 128))
      for w, st in ((4, 2), (8, 2), (4, 3), (8, 3))
    ]
  )
  original = flash_gpu._compiler_params
  try:
    for bq, bk, warps, stages in configs:
      flash_gpu._compiler_params = lambda *_, w=warps, st=stages: plgpu.CompilerParams(
        num_warps=w, num_stages=st
      )
      blocks = BlockSizes(bq, bk)
      try:
        tf, tb = measure(
          lambda q, k, v, blocks=blocks: flash_gpu.flash_attention(
            q, k, v, seg, blocks=blocks, interpret=args.smoke
          )
        )
        print(
          f"blocks {bq:3d}x{bk:3d} warps {warps} stages {stages}: fwd {tf:6.1f}  "
          f"fwd+bwd {tb:6.1f} TF/s",
          flush=True,
        )
      except Exception as e:  # e.g. shared memory exceeded: report, go on
        print(
          f"blocks {bq:3d}x{bk:3d} warps {warps} stages {stages}: failed: "
          f"{type(e).__name__}: {str(e)[:150]}"
        )
  finally:
    flash_gpu._compiler_params = original


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--block_q", type=int, default=128)
  parser.add_argument("--block_k", type=int, default=64)
  parser.add_argument("--bwd_block_q", type=int, default=64)
  parser.add_argument("--bwd_block_k", type=int, default=64)
  parser.add_argument("--layers", type=int, default=24, help="1.7B depth (lower if memory fails)")
  parser.add_argument(
    "--batch",
    type=int,
    default=4,
    help="sequences per step (8 runs out of memory on 80 GB: the [B, T, 256000] "
    "float32 logits and their gradient)",
  )
  parser.add_argument(
    "--impl",
    default=None,
    help="comma-separated attention implementations for the train step "
    "(default pallas_gpu,cudnn; pallas_gpu with --smoke)",
  )
  parser.add_argument("--train_reps", type=int, default=5)
  parser.add_argument(
    "--remat",
    default="dots_no_batch",
    help="comma-separated remat policies for the train step "
    "('none' runs out of memory at batch 4 on 80 GB)",
  )
  parser.add_argument(
    "--loss",
    default="full",
    choices=("full", "chunked", "tiled"),
    help="LossConfig.impl for the train step",
  )
  parser.add_argument("--loss_chunk", type=int, default=256, help="LossConfig.chunk (chunked)")
  parser.add_argument("--loss_token_tile", type=int, default=1024, help="LossConfig.token_tile")
  parser.add_argument("--loss_vocab_tile", type=int, default=4096, help="LossConfig.vocab_tile")
  parser.add_argument("--peak_flops", type=float, default=None)
  parser.add_argument("--sections", default="1,2,3,4")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  sections = set(args.sections.split(","))
  # Each section runs even when an earlier one breaks: device time is scarce, and one failed
  # compile (e.g. an API change in the GPU machine's newer jax) must not hide the other figures.
  ok = True
  for name, fn in (
    ("1", correctness),
    ("2", attention_table),
    ("3", train_step_mfu),
    ("4", block_sweep),
  ):
    if name not in sections:
      continue
    start = time.perf_counter()
    try:
      ok &= fn(args) is not False
    except Exception:  # reported in full, then counted as a failure
      traceback.print_exc()
      ok = False
    print(f"(section {name}: {time.perf_counter() - start:.0f} s)", flush=True)
  if not ok:
    raise SystemExit("gpu check FAILED (see above)")


if __name__ == "__main__":
  main()
