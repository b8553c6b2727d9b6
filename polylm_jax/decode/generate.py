"""Batched generation with a KV cache: one jitted prefill, then jitted decode steps.

Prompts of different lengths are left-padded into one batch so every row writes the same cache
slot at each step; a row's positions start at 0 at its first real token, and its padding is masked
out of attention (prefill: segment id 0 vs 1; decode: slots before the row's start). The cache has
logical axes like the parameters (`cache_batch`, `cache_heads`, ...) and is sharded by the same
rules, so a model sharded for training decodes on the same mesh.

Two layouts of the weights and the cache (`layout=`), the same numbers:
- `scan`: the training layout. Layers run in a lax.scan over stacked [L, ...] weights; the cache is
  one [L, B, H, S, K] array per half, written once per step after the scan. Where XLA reads a
  layer's slice of a stacked array in place (GPU, TPU) this costs nothing extra.
- `unrolled`: one array per layer, the layer loop unrolled; each layer's cache is its own buffer,
  written in place; the LM head reads a [d_model, vocab] copy of the embedding. XLA's CPU backend
  copies every layer's weights (and cache) out of stacked arrays at every step, which was a third
  of a decode step; this layout avoids that at the cost of one more copy of the weights (the
  caller's arrays are left as they are).
`auto` picks `unrolled` on CPU and `scan` elsewhere, and logs it.

On CPU the decode step's matrix products have one row per sequence: XLA's default library for them
(YNNPACK) reads the weights at about 60% of the memory bandwidth that its Eigen products reach at
such shapes (docs/benchmarks.md), so the decode-step program is compiled with YNNPACK off
(`decode_compiler_options`; logged; an `xla_cpu_experimental_ynn_fusion_type` of the user's own in
XLA_FLAGS is kept). The prefill, with a row per prompt token, keeps the default.

Shapes are bucketed (prompt length to a multiple of 32, cache length to a multiple of 64), so a
stream of requests compiles a handful of programs, not one per request. Decoding runs `chunk`
steps per dispatch; between chunks the host streams tokens and checks stop strings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polylm_jax import decode, sharding
from polylm_jax import framing as framing_lib
from polylm_jax.config import ModelConfig
from polylm_jax.decode import sampling
from polylm_jax.model import params as model_params

CACHE_LOGICAL = sharding.CACHE
LAYOUTS = decode.LAYOUTS
PROMPT_BUCKET = 32
CACHE_BUCKET = 64


@struct.dataclass
class DecodeState:
  """The decode loop's carry (jax.Arrays; the same structure holds their shardings)."""

  cache_k: Any  # [layers, batch, heads, slots, head_dim]; `unrolled`: a tuple of [b, h, s, k]
  cache_v: Any
  last: Any  # [batch] the newest token (not yet in the cache)
  slot: Any  # scalar: the cache slot `last` goes into
  start: Any  # [batch] first real slot of each row (left padding before it)
  seen: Any  # [batch, vocab] bool: tokens in the sequence (repetition penalty)
  done: Any  # [batch] bool
  key: Any


@dataclasses.dataclass
class Completion:
  text: str
  token_ids: list[int]
  finish_reason: str  # "eos" | "stop" | "length"
  prompt_tokens: int


class PromptTooLongError(ValueError):
  pass


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def choose_layout(layout: str, mesh: Mesh) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f"decode layout {layout!r} is not one of {', '.join(LAYOUTS)}")
  if layout != "auto":
    return layout
  platform = mesh.devices.flat[0].platform
  chosen = "unrolled" if platform == "cpu" else "scan"
  logging.info("decode layout: %s (auto on %s)", chosen, platform)
  return chosen


YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def decode_compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options for the decode-step program on `platform` (see the module docstring)."""
  if platform != "cpu":
    return None
  if YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.info("decode step on CPU: %s as set in XLA_FLAGS", YNN_FLAG)
    return None
  logging.info(
    "decode step on CPU: YNNPACK dots off (%s=''), Eigen's are faster at its rows", YNN_FLAG
  )
  return {YNN_FLAG: ""}


class Generator:
  """Generates from one model on one mesh. `tokenizer`: a SentencePiece processor. `params` are
  in `config`'s layout (stacked when config.scan_layers); `layout`: see the module docstring."""

  def __init__(
    self,
    config: ModelConfig,
    params,
    tokenizer,
    *,
    mesh: Mesh,
    rules=sharding.DEFAULT_RULES,
    framing: framing_lib.Framing = framing_lib.TRAINING,
    layout: str = "auto",
  ):
    self.config, self.sp = config, tokenizer
    self.mesh, self.rules, self.framing = mesh, tuple(rules), framing
    self.layout = choose_layout(layout, mesh)
    self.run_config = config.replace(scan_layers=self.layout == "scan")
    self.graphdef = model_params.graphdef(self.run_config)
    self.batch_parts = sharding.parts("cache_batch", mesh, self.rules)[0]
    self._prefills: dict = {}
    self._chunks: dict = {}
    self._chunk_options = decode_compiler_options(mesh.devices.flat[0].platform)
    self._relayout: Callable | None = None
    self._head: Callable | None = None  # the embedding, transposed (`unrolled`)
    if self.layout == "unrolled":
      spec = sharding.logical_to_mesh_spec(("embed", "vocab"), self.rules)
      self._head = jax.jit(jnp.transpose, out_shardings=NamedSharding(mesh, spec))
    self.set_params(params)
    # Every host reads the sampled tokens (stop strings, streaming): gathered, replicated.
    self._newest = jax.jit(lambda state: state.last, out_shardings=NamedSharding(mesh, P()))

  def set_params(self, params) -> None:
    """New parameters (in `config`'s layout, same shapes and shardings; compiled programs are
    kept), put into the decode layout: `self.params` = (model parameters, LM head [d, vocab] or
    None). Only what the layout changes is copied."""
    cfg, run = self.config, self.run_config
    # Host arrays are placed; arrays already in these shardings stay where they are (no copy).
    params = jax.device_put(params, self._model_shardings(cfg))
    if cfg.scan_layers != run.scan_layers:
      if self._relayout is None:
        shardings = self._model_shardings(run)
        relayout: Callable = model_params.unscanned_to_scan
        if cfg.scan_layers:
          relayout = functools.partial(model_params.scan_to_unscanned, num_layers=cfg.num_layers)
        self._relayout = jax.jit(relayout, out_shardings=shardings)
      params = self._relayout(params)
    self.params = (params, None if self._head is None else self._head(params["wte"]))

  def _model_shardings(self, cfg: ModelConfig):
    return sharding.tree_shardings(
      model_params.logical_axes(cfg), model_params.abstract_params(cfg), self.mesh, self.rules
    )

  # --- compiled pieces ---------------------------------------------------------------------
  def _shardings(self, batch: int, slots: int):
    rows = NamedSharding(self.mesh, sharding.logical_to_mesh_spec(("cache_batch",), self.rules))
    table = NamedSharding(
      self.mesh, sharding.logical_to_mesh_spec(("cache_batch", None), self.rules)
    )
    cache: Any = NamedSharding(self.mesh, sharding.logical_to_mesh_spec(CACHE_LOGICAL, self.rules))
    if self.layout == "unrolled":
      layer = sharding.logical_to_mesh_spec(CACHE_LOGICAL[1:], self.rules)
      cache = (NamedSharding(self.mesh, layer),) * self.config.num_layers
    replicated = NamedSharding(self.mesh, P())
    return (
      DecodeState(
        cache_k=cache,
        cache_v=cache,
        last=rows,
        slot=replicated,
        start=rows,
        seen=table,
        done=rows,
        key=replicated,
      ),
      table,
      rows,
    )

  def _prefill_fn(self, batch: int, prompt_len: int, slots: int, cfg: sampling.SamplingConfig):
    cfg = dataclasses.replace(cfg, seed=0)  # the seed is an input (the key), not compiled in
    key = (batch, prompt_len, slots, cfg)
    if key not in self._prefills:
      state_sh, table, rows = self._shardings(batch, slots)

      def prefill(params, tokens, start, rng):
        params, head_t = params
        model = model_params.model(self.graphdef, params)
        idx = jnp.arange(prompt_len)[None, :]
        positions = jnp.maximum(idx - start[:, None], 0)
        segments = (idx >= start[:, None]).astype(jnp.int32)
        hidden, (k, v) = model.prefill(tokens, positions, segments)
        logits = model.logits(hidden[:, -1:], head_t)[:, 0]
        seen = (
          jnp.zeros((batch, self.config.vocab_size), bool)
          .at[jnp.arange(batch)[:, None], tokens]
          .max(segments.astype(bool))
        )
        rng, now = jax.random.split(rng)
        first = sampling.next_token(logits, seen, now, cfg)
        return DecodeState(
          cache_k=jax.tree.map(lambda x: _to_cache(x, slots), k),
          cache_v=jax.tree.map(lambda x: _to_cache(x, slots), v),
          last=first,
          slot=jnp.asarray(prompt_len, jnp.int32),
          start=start,
          seen=seen.at[jnp.arange(batch), first].set(True),
          done=first == framing_lib.EOS_ID,
          key=rng,
        )

      self._prefills[key] = jax.jit(
        prefill, in_shardings=(self._param_shardings(), table, rows, None), out_shardings=state_sh
      )
    return self._prefills[key]

  def _param_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.params)

  def _chunk_fn(self, batch: int, slots: int, steps: int, cfg: sampling.SamplingConfig):
    cfg = dataclasses.replace(cfg, seed=0)
    key = (batch, slots, steps, cfg)
    if key not in self._chunks:
      state_sh, table, _ = self._shardings(batch, slots)

      def one(params, state: DecodeState):
        params, head_t = params
        model = model_params.model(self.graphdef, params)
        positions = (state.slot - state.start)[:, None]
        hidden, (ck, cv) = model.step(
          state.last[:, None], positions, state.cache_k, state.cache_v, state.slot, state.start
        )
        logits = model.logits(hidden, head_t)[:, 0]
        rng, now = jax.random.split(state.key)
        token = sampling.next_token(logits, state.seen, now, cfg)
        token = jnp.where(state.done, framing_lib.PAD_ID, token)
        return DecodeState(
          cache_k=ck,
          cache_v=cv,
          last=token,
          slot=state.slot + 1,
          start=state.start,
          seen=state.seen.at[jnp.arange(batch), token].set(True),
          done=state.done | (token == framing_lib.EOS_ID),
          key=rng,
        )

      def chunk(params, state):
        def body(s, _):
          s = one(params, s)
          return s, s.last

        state, tokens = jax.lax.scan(body, state, None, length=steps)
        return state, tokens.T

      self._chunks[key] = jax.jit(
        chunk,
        in_shardings=(self._param_shardings(), state_sh),
        out_shardings=(state_sh, NamedSharding(self.mesh, P())),
        donate_argnums=1,
        compiler_options=self._chunk_options,
      )
    return self._chunks[key]

  # --- public ------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    return self.framing.prompt(self.sp.encode(text))

  def generate(
    self,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling_config: sampling.SamplingConfig = sampling.SamplingConfig(),
    stop: Sequence[str] = (),
    truncate: str | None = None,
    chunk: int = 8,
    on_tokens: Callable[[int, list[int]], None] | None = None,
  ) -> list[Completion]:
    """Completions of `prompts` (texts, framed as in training, or already framed id lists).

    A prompt longer than the context is an error unless `truncate="left"` (its oldest tokens are
    dropped, with a warning). Generation stops at EOS, at a stop string (cut from the text), after
    `max_new_tokens`, or at the end of the context ("length"). `on_tokens(row, ids)` sees each
    row's new tokens as they come (streaming)."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    limit = self.config.max_length
    for i, row in enumerate(ids):
      if not row:
        raise ValueError(f"prompt {i} is empty (no tokens)")
      if len(row) > limit:
        if truncate != "left":
          raise PromptTooLongError(
            f"prompt {i} has {len(row)} tokens but the model's context is {limit}; shorten it "
            f"or ask for left truncation explicitly (truncate='left', --truncate_prompt=left)"
          )
        logging.warning(
          "prompt %d: %d tokens > context %d: its first %d tokens were dropped (truncate='left')",
          i,
          len(row),
          limit,
          len(row) - limit,
        )
        ids[i] = row[-limit:]
    n = len(ids)
    batch = _round_up(n, self.batch_parts)
    longest = max(len(r) for r in ids)
    prompt_len = min(_round_up(longest, PROMPT_BUCKET), limit)
    slots = min(_round_up(prompt_len + max_new_tokens, CACHE_BUCKET), limit)
    tokens = np.full((batch, prompt_len), framing_lib.PAD_ID, np.int32)
    start = np.full((batch,), prompt_len - 1, np.int32)
    for i, row in enumerate(ids):
      tokens[i, prompt_len - len(row) :] = row
      start[i] = prompt_len - len(row)
    tokens[n:, -1] = framing_lib.BOS_ID  # filler rows: one real token each
    with self.mesh, sharding.activate(self.mesh, self.rules):
      _, table, rows = self._shardings(batch, slots)
      state_rows = rows
      state = self._prefill_fn(batch, prompt_len, slots, sampling_config)(
        self.params,
        sharding.global_array(tokens, table),
        sharding.global_array(start, rows),
        jax.random.key(sampling_config.seed),
      )
      out: list[list[int]] = [[] for _ in range(n)]
      reasons: list[str | None] = [None] * n
      self._take(
        np.asarray(self._newest(state))[:, None], out, reasons, max_new_tokens, stop, on_tokens
      )
      while any(r is None for r in reasons):
        room = slots - int(state.slot)
        if room <= 0:
          break
        # Always `chunk` steps (tokens past a row's limit are dropped): one compiled program;
        # only near the end of the cache a power of two that fits.
        steps = chunk if room >= chunk else 1 << (room.bit_length() - 1)
        host_done = np.zeros(batch, bool)
        host_done[:n] = [r is not None for r in reasons]
        host_done[n:] = True
        state = state.replace(
          done=jnp.logical_or(state.done, sharding.global_array(host_done, state_rows))
        )
        state, new = self._chunk_fn(batch, slots, steps, sampling_config)(self.params, state)
        self._take(np.asarray(new), out, reasons, max_new_tokens, stop, on_tokens)
    return [
      self._completion(o, r or "length", stop, len(ids[i]))
      for i, (o, r) in enumerate(zip(out, reasons))
    ]

  def _take(self, new: np.ndarray, out, reasons, max_new: int, stop, on_tokens) -> None:
    for i in range(len(out)):
      if reasons[i] is not None:
        continue
      fresh = []
      for t in new[i].tolist():
        fresh.append(t)
        if t == framing_lib.EOS_ID:
          reasons[i] = "eos"
          break
        if len(out[i]) + len(fresh) >= max_new:
          reasons[i] = "length"
          break
      out[i].extend(fresh)
      if stop and reasons[i] is None and any(s in self.sp.decode(out[i]) for s in stop):
        reasons[i] = "stop"
      if on_tokens is not None and fresh:
        on_tokens(i, fresh)

  def _completion(self, ids: list[int], reason: str, stop, prompt_tokens: int) -> Completion:
    """The text is cut at the first stop string whatever ended the generation: a stop string
    can arrive in the same chunk of tokens as EOS or the length limit (lm-eval's `until`, and
    `--stop`, mean the text before it). Such a completion's finish reason is `stop`."""
    body = ids[:-1] if reason == "eos" else ids
    text = self.sp.decode(body)
    found = [text.find(s) for s in stop or () if s in text]
    if found:
      text, reason = text[: min(found)], "stop"
    return Completion(text, ids, reason, prompt_tokens)


def _to_cache(kv: jax.Array, slots: int) -> jax.Array:
  """A prefill's keys or values [(L,) B, T, H, K] -> a cache [(L,) B, H, slots, K]."""
  x = jnp.swapaxes(kv, -3, -2)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, slots - x.shape[-2]), (0, 0)])
  return sharding.constrain(x, CACHE_LOGICAL[-x.ndim :])
