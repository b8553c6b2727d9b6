"""The train step and optimizer: accumulation, skipping non-finite updates, schedule, decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polylm_jax import sharding
from polylm_jax.config import PRESETS
from polylm_jax.errors import NonFiniteError
from polylm_jax.model import params as model_params
from polylm_jax.optimizer import OptimizerConfig, decay_mask, lr_schedule
from polylm_jax.trainer import flops
from polylm_jax.trainer.loop import TrainerConfig, train
from polylm_jax.trainer.loss import LossConfig, per_token_nll, tiled_token_nll, token_nll
from polylm_jax.trainer.step import TrainStep

TINY = PRESETS["tiny"]


def _step(opt=None, mesh_shape=(1, 1, 1)):
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices)
  return TrainStep(
    model_config=TINY,
    optimizer_config=opt or OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10,
  )


def test_gradient_accumulation_matches_one_big_batch(make_batch):
  batch = make_batch(0, 8, 32, TINY.vocab_size)
  batch["weights"][:4, 25:] = 0.0  # unequal token counts per microbatch: the mean is over tokens
  results = []
  for accum, mesh_shape in ((1, (1, 1, 1)), (2, (1, 1, 1)), (4, (2, 1, 1))):
    step = _step(OptimizerConfig(warmup_steps=1, grad_accum_steps=accum), mesh_shape)
    state = step.init(0)
    with step.mesh, sharding.activate(step.mesh, step.rules):
      loss, grads, aux = jax.jit(step.loss_and_grads)(state.params, step.place_batch(batch))
      weight = aux["weight"]
    state, metrics = step(state, step.place_batch(batch))
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    results.append((float(loss), float(weight), jax.device_get(grads)))
  for loss, weight, grads in results[1:]:
    assert weight == results[0][1] == 8 * 32 - 4 * 7
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(results[0][2]))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
      grads,
      results[0][2],
    )
  with pytest.raises(ValueError, match="grad_accum_steps"):
    _step(OptimizerConfig(warmup_steps=1, grad_accum_steps=3)).check_batch_shape(8)


def _loss_and_grads(batch, loss_config, mesh_shape=(1, 1, 1)):
  cfg = TINY.replace(dtype="float32")
  mesh = sharding.make_mesh(
    sharding.MeshConfig(*mesh_shape), jax.devices()[: int(np.prod(mesh_shape))]
  )
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10,
    loss_config=loss_config,
  )
  state = step.init(0)
  with step.mesh, sharding.activate(step.mesh, step.rules):
    return jax.device_get(jax.jit(step.loss_and_grads)(state.params, step.place_batch(batch)))


@pytest.mark.parametrize(
  "loss_config, mesh_shape",
  [
    (LossConfig(impl="chunked", chunk=8), (1, 1, 1)),
    # Tiles that do not divide the 128 tokens nor the vocabulary: the padding is exercised.
    (LossConfig(impl="tiled", token_tile=48, vocab_tile=1000), (1, 1, 1)),
    (LossConfig(impl="tiled", token_tile=32, vocab_tile=512), (2, 2, 2)),  # sharded step
  ],
)
def test_chunked_and_tiled_losses_match_the_whole_logits(make_batch, loss_config, mesh_shape):
  """Same loss, per-language sums and gradients as the whole float32 logits."""
  batch = make_batch(0, 4, 32, TINY.vocab_size)
  batch["languages"] = np.repeat(np.arange(4)[:, None] + 1, 32, axis=1).astype(np.int32)
  loss0, grads0, aux0 = _loss_and_grads(batch, LossConfig())
  loss1, grads1, aux1 = _loss_and_grads(batch, loss_config, mesh_shape)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  np.testing.assert_allclose(aux1["language_loss"], aux0["language_loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads1, grads0)


def _loss_problem(n: int, d: int, v: int):
  """Hidden states [n, d], a table [v, d], targets and uneven per-token weights (the cotangent)."""
  rng = np.random.default_rng(0)
  return (
    jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
    jnp.asarray(rng.normal(size=(v, d)) * 0.3, jnp.float32),
    jnp.asarray(rng.integers(0, v, n), jnp.int32),
    jnp.asarray(rng.uniform(size=n), jnp.float32),
  )


def test_tiled_nll_values_and_gradients_equal_the_plain_ones():
  """The custom VJP against autodiff of logsumexp - target logit, with uneven weights per token
  (the cotangent), float32."""
  hidden, table, targets, weights = _loss_problem(70, 16, 300)

  def plain(h, w):
    return jnp.sum(token_nll(h @ w.T, targets) * weights)

  def tiled(h, w):
    return jnp.sum(tiled_token_nll(h, w, targets, 16, 64, jnp.float32) * weights)

  np.testing.assert_allclose(
    tiled_token_nll(hidden, table, targets, 16, 64, jnp.float32),
    token_nll(hidden @ table.T, targets),
    rtol=1e-6,
  )
  for a, b in zip(jax.grad(tiled, (0, 1))(hidden, table), jax.grad(plain, (0, 1))(hidden, table)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_tiled_nll_keeps_the_table_split_and_equals_the_plain_loss():
  """With the table split over `tensor` (the default rules), each shard's tiles cover its own
  rows: values and gradients equal the plain loss, and no device gathers the whole table."""
  import re

  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from polylm_jax.trainer.loss import vocab_parallel_token_nll

  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  v = 512
  hidden, table, targets, weights = _loss_problem(64, 16, v)

  def parallel(h, w):
    nll = vocab_parallel_token_nll(
      h, w, targets, 16, 64, jnp.float32, mesh=mesh, rules=sharding.DEFAULT_RULES, axes=("tensor",)
    )
    return jnp.sum(nll * weights)

  def plain(h, w):
    return jnp.sum(token_nll(h @ w.T, targets) * weights)

  placed = (
    jax.device_put(hidden, NamedSharding(mesh, P(("data", "fsdp"), None))),
    jax.device_put(table, NamedSharding(mesh, P("tensor", "fsdp"))),
  )
  grad = jax.jit(jax.value_and_grad(parallel, (0, 1)))
  value, grads = grad(*placed)
  np.testing.assert_allclose(value, plain(hidden, table), rtol=1e-6)
  for a, b in zip(grads, jax.grad(plain, (0, 1))(hidden, table)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  hlo = grad.lower(*placed).compile().as_text()
  # The leading dimension of every collective's result: never the whole vocabulary (the tiled
  # loss without vocab parallelism all-gathers f32[512,8] table tiles here).
  collectives = "all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all"
  leading = re.findall(rf"= f32\[(\d+)[,\]][^\n]*? (?:{collectives})\(", hlo)
  assert leading and str(v) not in leading, leading


def test_loss_settings_are_checked():
  with pytest.raises(ValueError, match="LossConfig.impl='blocked'"):
    LossConfig(impl="blocked")
  with pytest.raises(ValueError, match="LossConfig.vocab_tile=0 must be >= 1"):
    LossConfig(impl="tiled", vocab_tile=0)
  batch = {k: jnp.zeros((2, 32), jnp.int32) for k in ("inputs", "targets", "positions")}
  batch["segment_ids"] = jnp.ones((2, 32), jnp.int32)
  with pytest.raises(ValueError, match="LossConfig.chunk=12 does not divide the sequence length"):
    model = model_params.make_model(TINY)
    per_token_nll(model, batch, LossConfig(impl="chunked", chunk=12))


def test_nonfinite_update_is_skipped_and_counted(make_batch):
  step = _step()
  state = step.init(0)
  good = make_batch(0, 8, 32, TINY.vocab_size)
  state, _ = step(state, step.place_batch(good))
  before = jax.device_get(state)
  bad = dict(good, weights=np.full_like(good["weights"], np.nan))
  state, m = step(state, step.place_batch(bad))
  assert int(m["skipped"]) == 1 and int(m["nonfinite_in_a_row"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), before.opt_state)
  assert int(state.step) == int(before.step) + 1  # the batch was consumed
  state, m = step(state, step.place_batch(bad))
  assert int(m["nonfinite_in_a_row"]) == 2
  state, m = step(state, step.place_batch(good))
  assert int(m["skipped"]) == 0 and int(m["nonfinite_in_a_row"]) == 0
  assert int(m["nonfinite_total"]) == 2
  assert np.isfinite(float(m["loss"]))


def test_loop_stops_after_k_nonfinite_steps_in_a_row(make_batch, tmp_path):
  def batches():
    i = 0
    while True:
      b = make_batch(i, 8, 32, TINY.vocab_size)
      if i >= 2:
        b["weights"][:] = np.inf
      i += 1
      yield b

  trainer = TrainerConfig(num_steps=20, max_nonfinite_in_a_row=3, tensorboard=False)
  with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite.*max_nonfinite_in_a_row=3"):
    train(
      TINY,
      OptimizerConfig(warmup_steps=1),
      sharding.MeshConfig(data=-1),
      trainer,
      batches(),
      str(tmp_path),
    )
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 5  # steps 1-2 fine, 3-5 skipped, then stop


def test_callbacks_see_each_step_and_a_profile_covers_the_steps_asked_for(make_batch, tmp_path):
  """What the loop hands its callbacks (metrics one step late, each step after the checkpoint
  decision), a callback that stops the run, and the profiler callback's trace file."""
  from polylm_jax.trainer.callbacks import Callback, Profile

  seen = []

  class Recorder(Callback):
    def on_metrics(self, trainer, step, metrics):
      seen.append(("metrics", step, round(metrics["loss"], 3) > 0))

    def after_step(self, trainer, step):
      seen.append(("step", step, trainer.step == step))

    def wants_stop(self, trainer, step):
      return "enough" if step == 4 else None

  batches = (make_batch(i, 8, 32, TINY.vocab_size) for i in range(100))
  train(
    TINY,
    OptimizerConfig(warmup_steps=1),
    sharding.MeshConfig(data=-1),
    TrainerConfig(num_steps=10, tensorboard=False),
    batches,
    str(tmp_path),
    callbacks=[Recorder(), Profile(start_step=2, num_steps=2)],
  )
  assert seen == [
    ("step", 1, True),
    ("metrics", 1, True),
    ("step", 2, True),
    ("metrics", 2, True),
    ("step", 3, True),
    ("metrics", 3, True),
    ("step", 4, True),
    ("metrics", 4, True),
  ]
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_schedule_is_warmup_then_cosine_to_the_floor():
  cfg = OptimizerConfig(peak_lr=6e-5, end_lr=6e-6, warmup_steps=100)
  sched = lr_schedule(cfg, total_steps=1000)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(50)), 3e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 6e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(550)), (6e-5 + 6e-6) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(sched(1000)), 6e-6, rtol=1e-6)
  np.testing.assert_allclose(float(sched(5000)), 6e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="must exceed warmup_steps"):
    lr_schedule(OptimizerConfig(warmup_steps=2000), total_steps=100)


def test_weight_decay_skips_biases_and_norms_as_megatron_does():
  from polylm_jax.model import params as P

  abstract = P.abstract_params(TINY)
  mask = decay_mask(abstract, OptimizerConfig())
  assert mask["blocks"]["attn"]["qkv_kernel"] and mask["blocks"]["mlp"]["fc_kernel"]
  assert mask["wte"] and mask["wpe"]  # embeddings decay, as in Megatron-LM
  assert not mask["blocks"]["attn"]["qkv_bias"] and not mask["blocks"]["ln_1"]["scale"]
  assert not mask["ln_f"]["bias"]
  mask = decay_mask(abstract, OptimizerConfig(decay_embeddings=False, decay_norms_and_biases=True))
  assert not mask["wte"] and mask["blocks"]["ln_2"]["bias"]


def test_weight_decay_is_applied_to_matrices_only(make_batch):
  step = _step(OptimizerConfig(warmup_steps=1, weight_decay=0.5, b1=0.0))
  state = step.init(0)
  zero = make_batch(0, 8, 32, TINY.vocab_size)
  zero["weights"][:] = 0.0  # zero loss and gradients: only weight decay moves parameters
  old = jax.device_get(state.params)  # the step donates (and so deletes) its input state
  new, _ = step(state, step.place_batch(zero))  # lr(0) = 0
  new, _ = step(new, step.place_batch(zero))
  lr = float(lr_schedule(step.optimizer_config, 10)(1))
  assert lr > 0
  np.testing.assert_allclose(
    np.asarray(new.params["blocks"]["mlp"]["fc_kernel"]),
    old["blocks"]["mlp"]["fc_kernel"] * (1 - lr * 0.5),
    rtol=1e-6,
  )
  np.testing.assert_allclose(np.asarray(new.params["wte"]), old["wte"] * (1 - lr * 0.5), rtol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(new.params["blocks"]["ln_1"]["scale"]), old["blocks"]["ln_1"]["scale"]
  )


def test_flops_formula_and_peak_table():
  cfg = PRESETS["polylm_1.7b"]
  d, f, L, V, T = 2048, 8192, 24, 256000, 2048
  n = L * (4 * d * d + 2 * d * f) + V * d
  assert flops.matmul_params(cfg) == n
  assert flops.train_flops_per_token(cfg, T) == 6 * n + 6 * L * T * d

  class FakeDevice:  # only device_kind and platform are read
    device_kind = "NVIDIA H100 80GB HBM3"
    platform = "gpu"

  assert flops.peak_flops_per_device(FakeDevice()) == 989e12
  FakeDevice.device_kind, FakeDevice.platform = "cpu", "cpu"
  assert flops.peak_flops_per_device(FakeDevice()) is None
  assert flops.peak_flops_per_device(FakeDevice(), 1e12) == 1e12
