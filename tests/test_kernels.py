"""Pallas flash-attention kernels (interpret mode on CPU), dispatch rules, and real lowering:
Triton for CUDA via jax.export, Mosaic for a TPU topology ahead of time."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polylm_jax import sharding
from polylm_jax.config import PRESETS
from polylm_jax.kernels import dispatch, flash_gpu, flash_tpu
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model import params as P
from polylm_jax.model.attention import attention
from polylm_jax.model.attention import xla_attention as reference_attention
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.trainer.step import TrainStep

KERNELS = {"pallas_gpu": flash_gpu.flash_attention, "pallas_tpu": flash_tpu.flash_attention}
BLOCKS = BlockSizes(16, 32)  # several blocks along T=64, q and k blocks of different sizes
# Row 0: segments crossing block boundaries (16/32/48) and trailing padding; row 1: one document.
SEGMENTS = np.array([[1] * 20 + [2] * 30 + [3] * 10 + [0] * 4, [1] * 64], np.int32)


def _inputs(dtype, head_dim, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(2, 64, 2, head_dim)), dtype) for _ in range(4)]


def _rel(x, y):
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  return float(np.max(np.abs(x - y)) / np.max(np.abs(y)))


@pytest.mark.parametrize("impl", sorted(KERNELS))
@pytest.mark.parametrize(
  "dtype,head_dim,tol",
  [(jnp.float32, 64, 1e-5), (jnp.float32, 128, 1e-5), (jnp.bfloat16, 128, 2e-2)],
)
def test_forward_and_gradients_match_reference(impl, dtype, head_dim, tol):
  q, k, v, do = _inputs(dtype, head_dim)
  seg = jnp.asarray(SEGMENTS)
  kernel = lambda q, k, v: KERNELS[impl](q, k, v, seg, blocks=BLOCKS, interpret=True)
  # The reference sees the same (rounded) inputs, computed in float32.
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: reference_attention(f32(q), f32(k), f32(v), seg)
  out, vjp = jax.vjp(kernel, q, k, v)
  ref_out, ref_vjp = jax.vjp(ref, q, k, v)
  assert out.dtype == dtype
  assert _rel(out, ref_out) <= tol
  for name, got, want in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(f32(do))):
    assert got.dtype == dtype, name
    assert _rel(got, want) <= tol, name


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_backward_blocks_may_differ_from_the_forward(impl):
  """GPUs run the backward fastest with smaller blocks than the forward (BlockSizes.bwd_*)."""
  q, k, v, do = _inputs(jnp.float32, 64, seed=1)
  seg = jnp.asarray(SEGMENTS)
  blocks = BlockSizes(32, 16, bwd_block_q=16, bwd_block_k=32)
  kernel = lambda q, k, v: KERNELS[impl](q, k, v, seg, blocks=blocks, interpret=True)
  ref = lambda q, k, v: reference_attention(q, k, v, seg)
  out, vjp = jax.vjp(kernel, q, k, v)
  ref_out, ref_vjp = jax.vjp(ref, q, k, v)
  assert _rel(out, ref_out) <= 1e-5
  for name, got, want in zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do)):
    assert _rel(got, want) <= 1e-5, name
  with pytest.raises(ValueError, match="bwd_block_q=24 must be a power of two"):
    KERNELS[impl](q, k, v, seg, blocks=BlockSizes(32, 16, bwd_block_q=24), interpret=True)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_segments_are_isolated(impl):
  """Perturbing one packed document changes no output of another: catches ignored segment ids."""
  q, k, v, _ = _inputs(jnp.float32, 64, seed=1)
  seg = jnp.asarray(SEGMENTS)
  run = lambda q, k, v: attention(q, k, v, seg, impl=impl, interpret=True, blocks=BLOCKS)
  base = run(q, k, v)
  doc2 = (SEGMENTS == 2)[:, :, None, None]
  noise = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
  out = run(*(jnp.where(doc2, x + noise, x) for x in (q, k, v)))
  others = ~doc2[..., 0, 0]
  np.testing.assert_allclose(
    np.asarray(out)[others], np.asarray(base)[others], rtol=1e-6, atol=1e-6
  )
  assert not np.allclose(np.asarray(out)[doc2[..., 0, 0]], np.asarray(base)[doc2[..., 0, 0]])


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_model_loss_and_gradients_match_xla(impl, make_batch):
  cfg = PRESETS["tiny"]
  kernel_cfg = cfg.replace(attention_impl=impl, attention_interpret=True)
  params = P.init_params(cfg, 0)
  batch = make_batch(0, 2, 32, cfg.vocab_size, segments=(13, 11, 5))

  def loss(p, c):
    gdef = P.graphdef(c, BlockSizes(16, 16))  # several blocks along T=32
    logits = P.apply(gdef, p, batch["inputs"], batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])

  ref_loss, ref_grads = jax.value_and_grad(loss)(params, cfg)
  got_loss, got_grads = jax.value_and_grad(loss)(params, kernel_cfg)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got_grads, ref_grads
  )


@pytest.mark.parametrize(
  "kernel",
  # The TPU interpreter simulates the Mosaic kernel on each of 8 devices: 0.7-1.5 min on 2 cores.
  [pytest.param(k, marks=pytest.mark.slow) if k == "pallas_tpu" else k for k in sorted(KERNELS)],
)
def test_sharded_model_with_kernel_matches_xla(kernel, make_batch):
  """The kernel runs under shard_map over (data, fsdp) x tensor inside the jitted train step."""
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  batch = make_batch(0, 8, 32, PRESETS["tiny"].vocab_size, segments=(13, 11, 5))
  results = {}
  for impl in ("xla", kernel):
    cfg = PRESETS["tiny"].replace(attention_impl=impl, attention_interpret=True)
    step = TrainStep(
      model_config=cfg,
      optimizer_config=OptimizerConfig(warmup_steps=1),
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      total_steps=10,
      attention_blocks=BlockSizes(16, 16),
    )
    # One step: its loss is the kernel's forward, its gradient norm the kernel's backward (a
    # second step would repeat both: step 1's learning rate is 0 with warmup_steps=1).
    _, m = step(step.init(0), step.place_batch(batch))
    results[impl] = (float(m["loss"]), float(m["grad_norm"]))
  np.testing.assert_allclose(results[kernel], results["xla"], rtol=1e-5)


def test_explicit_choices_that_cannot_run_here_raise(caplog):
  q = jnp.zeros((1, 64, 2, 64), jnp.float32)
  for impl, needs in (("pallas_gpu", "GPU"), ("pallas_tpu", "TPU"), ("cudnn", "GPU")):
    with pytest.raises(
      ValueError,
      match=f"attention_impl='{impl}' needs a {needs} but this computation runs on 'cpu'",
    ):
      attention(q, q, q, None, impl=impl)
  with caplog.at_level(logging.INFO):
    dispatch._logged.clear()
    out = attention(q, q, q, None, impl="auto")
  assert "attention_impl='auto' chose 'xla' on platform 'cpu'" in caplog.text
  np.testing.assert_array_equal(out, attention(q, q, q, None, impl="xla"))


def test_auto_on_a_gpu_picks_the_kernel_measured_faster_for_the_rows(monkeypatch, caplog):
  """Packed rows: the Pallas kernel (1.54-1.59x cuDNN on an H100); unpacked bf16 rows: cuDNN
  (the Pallas kernel is 0.76-0.84x there); unpacked rows cuDNN cannot take: the Pallas kernel.
  Only the choice is checked here (no GPU): the platform is what the GPU reports."""
  monkeypatch.setattr(dispatch, "current_platform", lambda: "gpu")
  dispatch._logged.clear()
  bf16 = jnp.zeros((2, 256, 4, 128), jnp.bfloat16)
  with caplog.at_level(logging.INFO):
    assert dispatch.resolve("auto", bf16, packed=True) == "pallas_gpu"
    assert dispatch.resolve("auto", bf16, packed=False) == "cudnn"
    assert dispatch.resolve("auto", bf16.astype(jnp.float32), packed=False) == "pallas_gpu"
    wide = jnp.zeros((2, 256, 4, 256), jnp.bfloat16)  # head_dim 256: beyond cuDNN's 128
    assert dispatch.resolve("auto", wide, packed=False) == "pallas_gpu"
  assert "chose 'cudnn' on platform 'gpu' (length 256, head_dim 128, unpacked)" in caplog.text
  assert "chose 'pallas_gpu' on platform 'gpu' (length 256, head_dim 128, packed)" in caplog.text


def test_layout_and_block_requirements_are_checked_at_the_call():
  q = jnp.zeros((1, 64, 2, 48), jnp.float32)
  with pytest.raises(ValueError, match="head_dim 48 is not supported"):
    flash_gpu.flash_attention(q, q, q, interpret=True)
  q = jnp.zeros((1, 72, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="block_q=72 must be a power of two"):
    flash_tpu.flash_attention(q, q, q, interpret=True)
  q = jnp.zeros((1, 96, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="sequence length 96 is not a multiple of block_q=64"):
    flash_gpu.flash_attention(q, q, q, blocks=BlockSizes(64, 32), interpret=True)
  with pytest.raises(ValueError, match="block_k=32 must be a multiple of 128 on TPU"):
    flash_tpu.flash_attention(q, q, q, blocks=BlockSizes(32, 32))
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    flash_gpu.flash_attention(
      q.astype(jnp.float16), q.astype(jnp.float16), q.astype(jnp.float16), interpret=True
    )


def test_gpu_kernels_lower_to_triton_for_cuda():
  from jax import export

  x = jax.ShapeDtypeStruct((2, 256, 4, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)

  def loss(q, k, v, s):
    return jnp.sum(
      flash_gpu.flash_attention(q, k, v, s, blocks=BlockSizes(64, 64)).astype(jnp.float32)
    )

  exported = export.export(
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
    platforms=["cuda"],
    disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(x, x, x, seg)
  text = exported.mlir_module()
  assert text.count("xla.gpu.triton") == 3
  for name in ("polylm_flash_fwd_gpu", "polylm_flash_dq_gpu", "polylm_flash_dkv_gpu"):
    assert f'name = "{name}"' in text


@pytest.mark.slow
def test_tpu_train_step_with_kernel_compiles_for_a_v5p_slice():
  """The whole sharded train step, Mosaic kernel inside shard_map, compiled ahead of time."""
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2), topo.devices)
  cfg = PRESETS["tiny"].replace(
    d_model=256, num_heads=2, max_length=256, dtype="bfloat16", attention_impl="pallas_tpu"
  )
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10,
  )
  batch = step.abstract_batch(4, 256, languages=False)
  compiled = step.lower(step.abstract_state(), batch).compile()
  text = compiled.as_text()
  assert "tpu_custom_call" in text
  for name in ("polylm_flash_fwd_tpu", "polylm_flash_dq_tpu", "polylm_flash_dkv_tpu"):
    assert name in text
  assert compiled.memory_analysis() is not None


@pytest.mark.slow
def test_gpu_check_script_runs_in_smoke_mode():
  """The prepared one-command GPU check keeps working (tiny shapes, interpreter, CPU)."""
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(repo)
  proc = subprocess.run(
    [sys.executable, "bench/gpu_check.py", "--smoke"],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stdout.count("PASS") == 3 and "FAIL" not in proc.stdout
  assert "pallas_gpu / xla (fwd+bwd)" in proc.stdout and "tokens/s" in proc.stdout
