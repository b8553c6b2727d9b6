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
from polylm_jax.model import layers
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model.attention import attention
from polylm_jax.sharding import constrain

BTD = ("activation_batch", "activation_length", "activation_embed")
BTHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTF = ("activation_batch", "activation_length", "activation_mlp")

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.qkv_kernel = layers.normal(rngs, cfg.init_std, (d, 3, h, k), ("embed", "qkv", "heads", "kv"))
    self.qkv_bias = layers.zeros((3, h, k), ("qkv", "heads", "kv"))
    self.out_kernel = layers.normal(rngs, cfg.init_std, (h, k, d), ("heads", "kv", "embed"))
    self.out_bias = layers.zeros((d,), ("embed",))
    self.dtype = cfg.compute_dtype
    self.impl = cfg.attention_impl
    self.interpret = cfg.attention_interpret
    self.kernel_blocks = BlockSizes(cfg.attention_block_q, cfg.attention_block_k,
                                    cfg.attention_bwd_block_q or None,
                                    cfg.attention_bwd_block_k or None)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    dt = self.dtype
    qkv = jnp.einsum("btd,dchk->cbthk", x.astype(dt), self.qkv_kernel[...].astype(dt))
    qkv = qkv + self.qkv_bias[...].astype(dt)[:, None, None]
    q, k, v = (constrain(t, BTHK) for t in qkv)
    o = attention(q, k, v, segment_ids, causal=True, impl=self.impl, interpret=self.interpret,
                  blocks=self.kernel_blocks)
    out = jnp.einsum("bthk,hkd->btd", o, self.out_kernel[...].astype(dt))
    return out + self.out_bias[...].astype(dt)


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

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln_1 = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.attn = Attention(cfg, rngs)
    self.ln_2 = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    x = x + self.attn(self.ln_1(x), segment_ids).astype(jnp.float32)
    x = x + self.mlp(self.ln_2(x)).astype(jnp.float32)
    return constrain(x, BTD)


class PolyLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.wte = layers.normal(rngs, cfg.init_std, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.wpe = layers.normal(rngs, cfg.init_std, (cfg.max_length, cfg.d_model), ("position", "embed"))
    if cfg.scan_layers:
      # One Block whose parameters have a leading `layers` axis, run with lax.scan.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln_f = layers.LayerNorm(cfg.d_model, cfg.layer_norm_eps)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens, positions, segment_ids: [batch, length] int. Returns float32 logits [B, T, vocab].

    Packed rows pass per-document positions (restarting at 0) and segment ids; unpacked callers
    may leave both None.
    """
    return self.logits(self.hidden(tokens, positions, segment_ids))

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """The final LayerNorm's output, float32 [B, T, d_model] (what the LM head reads)."""
    cfg = self.config
    if tokens.shape[1] > cfg.max_length:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_length="
                       f"{cfg.max_length}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.wte[...], tokens, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
    x = constrain(x.astype(jnp.float32), BTD)
    x = self._blocks(x, segment_ids)
    return self.ln_f(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """LM head, tied to the token embedding: [B, T, d_model] -> float32 logits [B, T, vocab]."""
    dt = self.config.compute_dtype
    logits = jnp.einsum("btd,vd->btv", x.astype(dt), self.wte[...].astype(dt),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

  def _blocks(self, x, segment_ids):
    cfg = self.config

    def apply(graphdef, state, x):
      return nnx.merge(graphdef, state)(x, segment_ids)

    if cfg.remat_policy != "none":
      apply = jax.checkpoint(apply, policy=REMAT[cfg.remat_policy], static_argnums=(0,),
                             prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      x, _ = jax.lax.scan(lambda h, layer: (apply(graphdef, layer, h), None), x, state)
      return x
    for block in self.blocks:
      graphdef, state = nnx.split(block)
      x = apply(graphdef, state, x)
    return x
