"""The PolyLM decoder (released architecture = GPT-2 style), in Flax NNX.

Numerics follow the released training: float32 parameters, matmuls in `config.dtype` (bf16 by
default), LayerNorm / softmax / residual stream in float32. Parameter names and layouts are chosen
so that export to the Hugging Face GPT-2 layout is a reshape: `qkv.kernel` is [embed, 3, heads, kv],
i.e. GPT-2's fused `c_attn` [d, 3d] with q, k, v and heads in the same order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from polylm_jax.config import ModelConfig
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model import layers
from polylm_jax.model.attention import attention, cached_attention
from polylm_jax.sharding import BTD, BTF, BTHK, BTV, constrain

F32 = jnp.float32
REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, blocks: BlockSizes = BlockSizes()):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.qkv_kernel = layers.normal(
      rngs, cfg.init_std, (d, 3, h, k), ("embed", "qkv", "heads", "kv")
    )
    self.qkv_bias = layers.zeros((3, h, k), ("qkv", "heads", "kv"))
    self.out_kernel = layers.normal(rngs, cfg.init_std, (h, k, d), ("heads", "kv", "embed"))
    self.out_bias = layers.zeros((d,), ("embed",))
    self.dtype = cfg.compute_dtype
    self.impl = cfg.attention_impl
    self.interpret = cfg.attention_interpret
    self.kernel_blocks = blocks  # how a Pallas kernel tiles the sequence; not the model

  def _qkv(self, x: jax.Array):
    dt = self.dtype
    # [B, T, 3, H, K]: batch-major output (a "cbthk" output layout costs a transpose, 2.7x
    # slower at decode shapes on CPU), then q, k, v sliced off.
    qkv = jnp.einsum("btd,dchk->btchk", x.astype(dt), self.qkv_kernel[...].astype(dt))
    qkv = qkv + self.qkv_bias[...].astype(dt)
    return tuple(constrain(qkv[:, :, i], BTHK) for i in range(3))

  def _out(self, o: jax.Array) -> jax.Array:
    dt = self.dtype
    out = jnp.einsum("bthk,hkd->btd", o, self.out_kernel[...].astype(dt))
    return out + self.out_bias[...].astype(dt)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    return self.prefill(x, segment_ids)[0]

  def prefill(self, x: jax.Array, segment_ids: jax.Array | None):
    """The output and this call's keys and values (what a KV cache keeps)."""
    q, k, v = self._qkv(x)
    o = attention(
      q,
      k,
      v,
      segment_ids,
      causal=True,
      impl=self.impl,
      interpret=self.interpret,
      blocks=self.kernel_blocks,
    )
    return self._out(o), (k, v)

  def step(
    self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, slot: jax.Array, start: jax.Array
  ):
    """New tokens x [B, T, D] at cache slots slot..slot+T-1 attend to the cache [B, H, S, K]
    (from each row's `start` slot on: left padding) and to each other, causally. Returns the
    output and the cache with their keys and values written in: for one layer's own cache
    buffer an in-place update. (A stacked cache uses `step_read_only`.)"""
    q, k, v = self._qkv(x)
    cache_k = jax.lax.dynamic_update_slice_in_dim(
      cache_k, k.astype(cache_k.dtype).swapaxes(1, 2), slot, axis=2
    )
    cache_v = jax.lax.dynamic_update_slice_in_dim(
      cache_v, v.astype(cache_v.dtype).swapaxes(1, 2), slot, axis=2
    )
    return self._out(cached_attention(q, cache_k, cache_v, slot, start)), (cache_k, cache_v)

  def step_read_only(
    self, x: jax.Array, cache_k: jax.Array, cache_v: jax.Array, slot: jax.Array, start: jax.Array
  ):
    """step() for one layer's slice of a stacked cache inside the layer scan: the cache is only
    read and the new keys and values [B, T, H, K] are returned for the caller to write (once, for
    all layers: writing inside the scan would copy the whole cache every step)."""
    q, k, v = self._qkv(x)
    k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)
    o = cached_attention(q, cache_k, cache_v, slot, start, new_k=k, new_v=v)
    return self._out(o), (k, v)


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    self.fc_kernel = layers.normal(rngs, cfg.init_std, (d, f), ("embed", "mlp"))
    self.fc_bias = layers.zeros((f,), ("mlp",))
    self.proj_kernel = layers.normal(rngs, cfg.init_std, (f, d), ("mlp", "embed"))
    self.proj_bias = layers.zeros((d,), ("embed",))
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    h = x.astype(dt) @ self.fc_kernel[...].astype(dt) + self.fc_bias[...].astype(dt)
    h = constrain(jax.nn.gelu(h, approximate=True), BTF)  # GPT-2's "gelu_new" (tanh approximation)
    return h @ self.proj_kernel[...].astype(dt) + self.proj_bias[...].astype(dt)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block; the residual stream is float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, blocks: BlockSizes = BlockSizes()):
    self.ln_1 = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.attn = Attention(cfg, rngs, blocks)
    self.ln_2 = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    return self.prefill(x, segment_ids)[0]

  def _finish(self, x, attn_out):
    x = x + attn_out.astype(jnp.float32)
    x = x + self.mlp(self.ln_2(x)).astype(jnp.float32)
    return constrain(x, BTD)

  def prefill(self, x: jax.Array, segment_ids: jax.Array | None):
    a, kv = self.attn.prefill(self.ln_1(x), segment_ids)
    return self._finish(x, a), kv

  def step(self, x, cache_k, cache_v, slot, start, *, read_only: bool = False):
    attend = self.attn.step_read_only if read_only else self.attn.step
    a, kv = attend(self.ln_1(x), cache_k, cache_v, slot, start)
    return self._finish(x, a), kv


class PolyLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, blocks: BlockSizes = BlockSizes()):
    """`blocks`: the attention kernels' block sizes (kernels/common.py), a computation setting
    kept out of ModelConfig; the train step takes them from TrainerConfig.attention_blocks."""
    self.config = cfg
    self.wte = layers.normal(rngs, cfg.init_std, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.wpe = layers.normal(
      rngs, cfg.init_std, (cfg.max_length, cfg.d_model), ("position", "embed")
    )
    if cfg.scan_layers:
      # One Block whose parameters have a leading `layers` axis, run with lax.scan.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs, blocks)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs, blocks) for _ in range(cfg.num_layers)])
    self.ln_f = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """tokens, positions, segment_ids: [batch, length] int. Returns float32 logits [B, T, vocab].

    Packed rows pass per-document positions (restarting at 0) and segment ids; unpacked callers
    may leave both None.
    """
    return self.logits(self.hidden(tokens, positions, segment_ids))

  def hidden(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """The final LayerNorm's output, float32 [B, T, d_model] (what the LM head reads)."""
    x = self._embed(tokens, positions)
    x, _ = self._layers(x, lambda block, h, _: (block(h, segment_ids), None), remat=True)
    return self.ln_f(x)

  def prefill(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ):
    """hidden() and every layer's keys and values [B, T, H, K]: stacked [L, ...] when the
    layers are scanned, else tuples of L arrays (what the two cache layouts of step() hold,
    once slots are made the third axis)."""
    x = self._embed(tokens, positions)
    x, kv = self._layers(x, lambda block, h, _: block.prefill(h, segment_ids))
    return self.ln_f(x), kv

  def step(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    cache_k,
    cache_v,
    slot: jax.Array,
    start: jax.Array,
  ):
    """Decode: new tokens [B, T] at cache slots slot.. (see Attention.step). Returns the final
    hidden states and the cache with the new keys and values written in.

    The cache follows the parameters' layout: stacked [L, B, H, S, K] arrays when the layers are
    scanned (written once after the scan: one in-place update of the donated cache), a tuple of
    L per-layer [B, H, S, K] arrays otherwise (each written in place inside its layer)."""
    x = self._embed(tokens, positions)
    if not self.config.scan_layers:
      x, cache = self._layers(
        x, lambda block, h, c: block.step(h, c[0], c[1], slot, start), (cache_k, cache_v)
      )
      return self.ln_f(x), cache
    x, (k, v) = self._layers(
      x,
      lambda block, h, c: block.step(h, c[0], c[1], slot, start, read_only=True),
      (cache_k, cache_v),
    )
    # [L, B, T, H, K] -> the cache's [L, B, H, T, K], written at slot
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.swapaxes(2, 3), slot, axis=3)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.swapaxes(2, 3), slot, axis=3)
    return self.ln_f(x), (cache_k, cache_v)

  def _embed(self, tokens, positions):
    cfg = self.config
    if tokens.shape[1] > cfg.max_length:
      raise ValueError(
        f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_length={cfg.max_length}"
      )
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.wte[...], tokens, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
    return constrain(x.astype(jnp.float32), BTD)

  def logits(self, x: jax.Array, head_t: jax.Array | None = None) -> jax.Array:
    """LM head, tied to the token embedding: [B, T, d_model] -> float32 logits [B, T, vocab].

    `head_t`: the embedding transposed, [d_model, vocab], where a caller keeps that copy (the
    per-layer decode layout: on CPU a vocab-minor right operand is ~1.6x faster at decode's
    few rows)."""
    dt = self.config.compute_dtype
    x = x.astype(dt)
    if head_t is None:
      logits = jnp.einsum("btd,vd->btv", x, self.wte[...].astype(dt), preferred_element_type=F32)
    else:
      logits = jnp.einsum("btd,dv->btv", x, head_t.astype(dt), preferred_element_type=F32)
    return constrain(logits, BTV)

  def _layers(self, x, call, per_layer=None, *, remat: bool = False):
    """Runs `call(block, x, layer_input) -> (x, layer_output)` through the layers and returns x
    and the layer outputs. Scanned layers (lax.scan over the stacked blocks) take and give them
    stacked [L, ...]; unscanned layers as tuples of L arrays, one per layer (each layer's own
    buffers: nothing is sliced out or stacked)."""
    cfg = self.config

    def apply(graphdef, state, h, layer_input):
      return call(nnx.merge(graphdef, state), h, layer_input)

    if remat and cfg.remat_policy != "none":
      apply = jax.checkpoint(
        apply, policy=REMAT[cfg.remat_policy], static_argnums=(0,), prevent_cse=not cfg.scan_layers
      )
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(h, xs):
        layer, layer_input = xs
        return apply(graphdef, layer, h, layer_input)

      return jax.lax.scan(body, x, (state, per_layer))
    per_layer_tuple = lambda n: isinstance(n, tuple) and all(isinstance(a, jax.Array) for a in n)
    outputs = []
    for i, block in enumerate(self.blocks):
      graphdef, state = nnx.split(block)
      layer_input = jax.tree.map(lambda t, i=i: t[i], per_layer, is_leaf=per_layer_tuple)
      x, out = apply(graphdef, state, x, layer_input)
      outputs.append(out)
    return x, jax.tree.map(lambda *a: a, *outputs)
