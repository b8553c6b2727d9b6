"""The PolyLM model: sizes, init, logical axes, packing, numerics, scan/unscanned equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polylm_jax.config import PRESETS, analytic_param_count, model_config
from polylm_jax.model import params as P
from polylm_jax.model.attention import attention

TINY = PRESETS["tiny"]


@pytest.mark.parametrize(
  "name,expected", [("polylm_1.7b", 1_737_084_928), ("polylm_13b", 13_906_790_400)]
)
def test_released_sizes_param_count_without_allocation(name, expected):
  cfg = PRESETS[name]
  abstract = P.abstract_params(cfg)  # nnx.eval_shape: ShapeDtypeStructs only
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  d, f, L, V, T = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.vocab_size, cfg.max_length
  per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
  written_out = V * d + T * d + L * per_layer + 2 * d  # tied head: no extra V*d
  assert counted == written_out == analytic_param_count(cfg) == expected


def test_every_parameter_has_logical_axes():
  for scan in (True, False):
    cfg = TINY.replace(scan_layers=scan)
    axes = P.logical_axes(cfg)
    shapes = P.abstract_params(cfg)
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_axes) == len(flat_shapes) > 10
    for (path, names), shape in zip(flat_axes, flat_shapes):
      assert len(names) == len(shape.shape), jax.tree_util.keystr(path)
      assert all(isinstance(n, str) for n in names), jax.tree_util.keystr(path)
      if scan and "blocks" in jax.tree_util.keystr(path):
        assert names[0] == "layers"
  assert P.logical_axes(TINY)["wte"] == ("vocab", "embed")


def test_init_follows_released_recipe():
  cfg = TINY.replace(vocab_size=8192, d_model=128, num_heads=4, d_ff=512)
  params = P.init_params(cfg, seed=3)
  for w in (
    params["wte"],
    params["wpe"],
    params["blocks"]["attn"]["qkv_kernel"],
    params["blocks"]["mlp"]["fc_kernel"],
  ):
    assert abs(float(jnp.std(w)) - 0.006) < 0.0003
    assert abs(float(jnp.mean(w))) < 1e-4
  for b in (
    params["blocks"]["attn"]["qkv_bias"],
    params["blocks"]["mlp"]["proj_bias"],
    params["ln_f"]["bias"],
  ):
    assert not np.any(np.asarray(b))
  np.testing.assert_array_equal(params["blocks"]["ln_1"]["scale"], 1.0)


def _logits(cfg, params, tokens, positions=None, segment_ids=None):
  return P.apply(P.graphdef(cfg), params, jnp.asarray(tokens), positions, segment_ids)


def test_scanned_and_unscanned_agree_and_convert():
  params = P.init_params(TINY, 0)
  tokens = np.arange(2 * 16).reshape(2, 16) % TINY.vocab_size
  scanned = _logits(TINY, params, tokens)
  unscanned_cfg = TINY.replace(scan_layers=False)
  per_layer = P.scan_to_unscanned(params, TINY.num_layers)
  np.testing.assert_allclose(
    _logits(unscanned_cfg, per_layer, tokens), scanned, rtol=1e-6, atol=1e-6
  )
  # The unscanned model's own init has the same tree as the converted one.
  assert jax.tree.structure(P.init_params(unscanned_cfg, 0)) == jax.tree.structure(per_layer)
  back = P.unscanned_to_scan(per_layer)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_do_not_change_gradients(policy):
  params = P.init_params(TINY, 0)
  tokens = jnp.arange(32).reshape(2, 16)

  def loss(p, cfg):
    return jnp.mean(_logits(cfg, p, tokens) ** 2)

  ref = jax.grad(loss)(params, TINY)
  for scan in (True, False):
    cfg = TINY.replace(remat_policy=policy, scan_layers=scan)
    p = params if scan else P.scan_to_unscanned(params, TINY.num_layers)
    got = jax.grad(loss)(p, cfg)
    if not scan:
      got = P.unscanned_to_scan(got)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, ref)


def test_packed_row_equals_documents_run_alone():
  """Packing: a row holding two documents gives each the logits it gets on its own."""
  params = P.init_params(TINY, 1)
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(3, TINY.vocab_size, 10), rng.integers(3, TINY.vocab_size, 6)
  row = np.concatenate([doc_a, doc_b])[None]
  seg = np.array([[1] * 10 + [2] * 6])
  pos = np.array([list(range(10)) + list(range(6))])
  packed = _logits(TINY, params, row, jnp.asarray(pos), jnp.asarray(seg))
  alone_a = _logits(TINY, params, doc_a[None])
  alone_b = _logits(TINY, params, doc_b[None])
  np.testing.assert_allclose(packed[0, :10], alone_a[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(packed[0, 10:], alone_b[0], rtol=1e-5, atol=1e-6)


def test_segments_are_isolated():
  params = P.init_params(TINY, 1)
  rng = np.random.default_rng(1)
  row = rng.integers(3, TINY.vocab_size, (1, 24))
  seg = jnp.asarray([[1] * 8 + [2] * 8 + [3] * 8])
  pos = jnp.asarray([list(range(8)) * 3])
  base = _logits(TINY, params, row, pos, seg)
  changed = row.copy()
  changed[0, 8:16] = rng.integers(3, TINY.vocab_size, 8)  # rewrite document 2 only
  out = _logits(TINY, params, changed, pos, seg)
  np.testing.assert_array_equal(out[0, :8], base[0, :8])
  np.testing.assert_array_equal(out[0, 16:], base[0, 16:])
  assert not np.allclose(out[0, 8:16], base[0, 8:16])


def test_causal():
  params = P.init_params(TINY, 2)
  row = np.arange(1, 17)[None]
  base = _logits(TINY, params, row)
  changed = row.copy()
  changed[0, 10] = 99
  out = _logits(TINY, params, changed)
  np.testing.assert_array_equal(out[0, :10], base[0, :10])
  assert not np.allclose(out[0, 10:], base[0, 10:])


def test_tied_head_and_gpt2_layer_math():
  """Logits are ln_f(h) @ wte.T, blocks are pre-LN with tanh GeLU: recomputed here by hand."""
  cfg = TINY.replace(num_layers=1, scan_layers=False)
  params = P.init_params(cfg, 0)
  tokens = np.array([[5, 6, 7, 8]])
  got = _logits(cfg, params, tokens)

  def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  p = jax.tree.map(np.asarray, params)
  blk = p["blocks"][0]
  x = p["wte"][tokens[0]] + p["wpe"][:4]
  h = ln(x, blk["ln_1"])
  qkv = np.einsum("td,dchk->cthk", h, blk["attn"]["qkv_kernel"]) + blk["attn"]["qkv_bias"][:, None]
  q, k, v = qkv
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
  s = np.where(np.tril(np.ones((4, 4), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("hqk,khd->qhd", a, v)
  x = x + np.einsum("thk,hkd->td", o, blk["attn"]["out_kernel"]) + blk["attn"]["out_bias"]
  h = ln(x, blk["ln_2"]) @ blk["mlp"]["fc_kernel"] + blk["mlp"]["fc_bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  x = x + h @ blk["mlp"]["proj_kernel"] + blk["mlp"]["proj_bias"]
  expected = ln(x, p["ln_f"]) @ p["wte"].T
  np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)


def test_bf16_matmuls_keep_float32_logits_and_stay_close():
  params = P.init_params(TINY, 0)
  tokens = np.arange(32).reshape(2, 16)
  f32 = _logits(TINY, params, tokens)
  bf16_cfg = TINY.replace(dtype="bfloat16")
  bf16 = _logits(bf16_cfg, params, tokens)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(bf16 - f32))) < 2e-2
  assert not np.array_equal(np.asarray(bf16), np.asarray(f32))  # the matmuls really ran in bf16
  jaxpr = str(jax.make_jaxpr(lambda p: _logits(bf16_cfg, p, tokens))(params))
  assert "bf16" in jaxpr


def test_bad_config_and_inputs_fail_clearly():
  with pytest.raises(ValueError, match="num_heads"):
    TINY.replace(num_heads=5)
  with pytest.raises(ValueError, match="remat_policy"):
    TINY.replace(remat_policy="sometimes")
  with pytest.raises(ValueError, match="unknown ModelConfig field"):
    model_config("tiny", {"n_layer": 3})
  with pytest.raises(ValueError, match="not a known preset"):
    model_config("polylm_7b")
  with pytest.raises(ValueError, match="max_length"):
    _logits(TINY, P.init_params(TINY, 0), np.zeros((1, TINY.max_length + 1), np.int32))


def test_attention_matches_naive_and_rejects_unknown_impl():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 8, 2, 4)).astype(np.float32) for _ in range(3))
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]] * 2)
  out = attention(q, k, v, jnp.asarray(seg))
  for b in range(2):
    for h in range(2):
      for i in range(8):
        ok = [j for j in range(8) if j <= i and seg[b, j] == seg[b, i]]
        s = q[b, i, h] @ k[b, ok, h].T / 2.0
        w = np.exp(s - s.max())
        w /= w.sum()
        np.testing.assert_allclose(out[b, i, h], w @ v[b, ok, h], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention_impl=.nope. is not one of"):
    attention(q, k, v, None, impl="nope")
  with pytest.raises(ValueError, match="segment_ids"):
    attention(q, k, v, jnp.zeros((2, 7), jnp.int32))


def test_configs_recorded_before_computation_settings_moved_out_still_load():
  """Checkpoints and exports record ModelConfig as a dict; records from before the loss and the
  kernels' block sizes left ModelConfig load as the same model."""
  import dataclasses

  from polylm_jax.config import ModelConfig

  tiny = PRESETS["tiny"]
  old = dict(
    dataclasses.asdict(tiny),
    loss_chunk=256,
    attention_block_q=64,
    attention_block_k=64,
    attention_bwd_block_q=0,
    attention_bwd_block_k=0,
  )
  assert ModelConfig.from_dict(old) == tiny
  with pytest.raises(TypeError):
    ModelConfig.from_dict(dict(old, hidden_size=3))  # anything else is still an error
