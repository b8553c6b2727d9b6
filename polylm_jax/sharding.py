"""The device mesh and the logical-to-mesh axis rules: the only module that knows mesh axis names.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, ...) in its `nnx.Param`
metadata; activations are constrained with `activation_*` names. `DEFAULT_RULES` maps each logical
name to mesh axes, as plain data (in the spirit of t5x's `partitioning.py`): to change how a model
is laid out, change the rules (gin: `MeshConfig.rule_overrides` for single rules, `MeshConfig.rules`
for the whole table), not the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polylm_jax.typecheck import check_fields

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]  # (logical name, mesh axis | tuple of mesh axes | None)

# Logical names of activations, defined once: the model, the train step, decoding and scoring
# constrain and place arrays with these (the rules below map them to mesh axes).
BATCH = "activation_batch"
ROWS = (BATCH, "activation_length")  # [batch, length] token arrays
BTD = (BATCH, "activation_length", "activation_embed")  # the residual stream
BTHK = (BATCH, "activation_length", "activation_heads", "activation_kv")  # q, k, v
BTF = (BATCH, "activation_length", "activation_mlp")  # the MLP's hidden layer
BTV = (BATCH, "activation_length", "activation_vocab")  # logits
CACHE = ("layers", "cache_batch", "cache_heads", "cache_sequence", "cache_kv")  # the KV cache

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  # activations: batch split over both data-parallel axes, features over `tensor`
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv", None),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
  # the decode-time KV cache [layers, batch, slots, heads, head_dim]: like the activations
  ("cache_batch", ("data", "fsdp")),
  ("cache_sequence", None),
  ("cache_heads", "tensor"),
  ("cache_kv", None),
  # parameters: ZeRO-3 style over `fsdp` along embed, Megatron-style over `tensor`
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("position", None),
  ("qkv", None),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh sizes; -1 (at most one axis) means "all the devices the others leave". `rules` replaces
  the whole table; `rule_overrides` ({logical name: mesh axes}) changes or adds single rules."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
  rule_overrides: dict[str, Any] | None = None

  def __post_init__(self):
    check_fields(self)
    names = [name for name, _ in self.rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(
        f"MeshConfig.rules names {dupes} more than once; each logical axis needs "
        f"exactly one rule (change one with MeshConfig.rule_overrides)"
      )
    for name, target in list(self.rules) + list((self.rule_overrides or {}).items()):
      axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
      bad = [a for a in axes if a not in MESH_AXES]
      if bad:
        raise ValueError(f"MeshConfig rule {name!r} -> {target!r}: {bad} not mesh axes {MESH_AXES}")

  @property
  def effective_rules(self) -> tuple[tuple[str, Any], ...]:
    """`rules` with `rule_overrides` applied (an override of a new name adds a rule)."""
    overrides = dict(self.rule_overrides or {})
    merged = [(name, overrides.pop(name, target)) for name, target in self.rules]
    return tuple(merged + [(name, target) for name, target in overrides.items()])

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    for name, size in sizes.items():
      if size == 0 or size < -1:
        raise ValueError(f"MeshConfig.{name}={size}: sizes must be positive or -1")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
      raise ValueError(f"MeshConfig: only one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
      if num_devices % fixed:
        raise ValueError(
          f"MeshConfig({_fmt(sizes)}): the fixed axes multiply to {fixed}, which does not divide "
          f"the {num_devices} devices, so MeshConfig.{free[0]}=-1 cannot be resolved"
        )
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise ValueError(
        f"MeshConfig({_fmt(sizes)}): data*fsdp*tensor = {fixed} but there are {num_devices} "
        f"devices; change MeshConfig.data/fsdp/tensor (or set one of them to -1)"
      )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def parse_mesh(spec: str | None) -> "MeshConfig":
  """A mesh from 'data,fsdp,tensor' sizes (e.g. '1,1,8'; -1 = the devices the others leave);
  empty: every device on `data`. For command-line tools that take --mesh."""
  if not spec:
    return MeshConfig()
  try:
    parts = [int(x) for x in str(spec).split(",")]
  except ValueError:
    parts = []
  if len(parts) != 3:
    raise ValueError(f"--mesh={spec!r}: expected three sizes data,fsdp,tensor (e.g. 1,1,8)")
  return MeshConfig(data=parts[0], fsdp=parts[1], tensor=parts[2])


def _fmt(sizes: dict[str, int]) -> str:
  return ", ".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = config.resolve(len(devices))
  try:
    from jax.experimental import mesh_utils

    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    # Topology-aware placement only exists for some platforms; a plain reshape is what it would
    # give on CPU. Logged so a TPU user notices a surprising layout.
    logging.info("mesh_utils.create_device_mesh(%s) failed (%s); using devices in order", shape, e)
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def parts(logical: str, mesh: Mesh, rules: Rules) -> tuple[int, tuple[str, ...]]:
  """How many ways the rules split a logical axis on this mesh, and over which mesh axes."""
  target = dict(rules).get(logical)
  axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
  return math.prod(mesh.shape[a] for a in axes), axes


def check_model_fits_mesh(model_config, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
  """Fail before compiling when the mesh cannot split the model's heads (as the rules say)."""
  for logical in ("heads", "activation_heads"):
    n, axes = parts(logical, mesh, rules)
    if model_config.num_heads % n:
      raise ValueError(
        f"the mesh splits attention heads {n} ways (rule {logical!r} -> mesh axes {axes}), "
        f"which does not divide ModelConfig.num_heads={model_config.num_heads} "
        f"({model_config.name}); change the mesh or the rule"
      )


def batch_parts(mesh: Mesh, rules: Rules) -> int:
  """How many ways the rules split the batch: global batches must be a multiple of it."""
  return parts(BATCH, mesh, rules)[0]


def check_process_rows(batch_sharding: NamedSharding, global_rows: int) -> None:
  """Process p of M must hold rows [p B/M, (p+1) B/M) of every global batch: those are the rows
  its data streams produce (data/resumable.py), so any other layout would train on the wrong
  rows. Fails naming the rows this process's devices hold instead."""
  p, m = jax.process_index(), jax.process_count()
  if m == 1:
    return
  held: set[int] = set()
  for index in batch_sharding.addressable_devices_indices_map((global_rows, 1)).values():
    held.update(range(*index[0].indices(global_rows)) if index else range(global_rows))
  per = global_rows // m
  if held != set(range(p * per, (p + 1) * per)):
    raise ValueError(
      f"process {p} of {m}: its devices hold rows {sorted(held)[:8]}... of the global batch of "
      f"{global_rows}, not the block [{p * per}, {(p + 1) * per}) its data streams produce; "
      f"the mesh must place each process's devices on a contiguous block of the batch axis "
      f"(MeshConfig order data, fsdp, tensor with processes outermost)"
    )


def global_array(x: np.ndarray, target: NamedSharding) -> jax.Array:
  """A jax.Array laid out by `target` from a host array that every process holds in full (the
  same on all hosts: prompts, evaluation requests); works on one host and on many."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def logical_to_mesh_spec(logical: Sequence[str | None] | None, rules: Rules) -> P:
  """Maps a tuple of logical axis names to a mesh PartitionSpec using `rules`."""
  if logical is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out: list[Any] = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(
        f"logical axis {name!r} has no rule; add it with MeshConfig.rule_overrides "
        f"(known: {sorted(table)})"
      )
    target = table[name]
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for axis in axes:
      if axis not in MESH_AXES:
        raise ValueError(f"rule {name!r} -> {target!r}: {axis!r} is not a mesh axis {MESH_AXES}")
      if axis in used:
        raise ValueError(f"logical axes {tuple(logical)} map mesh axis {axis!r} twice")
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
  """A dimension that a mesh axis cannot split evenly is an error naming the tensor."""
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
      raise ValueError(
        f"{path}: dimension {dim} (size {size}) cannot be split {parts} ways over mesh axes "
        f"{axes}; change the mesh or the rules for this logical axis"
      )


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh, rules: Rules, *, prefix: str = ""):
  """NamedShardings for a tree, from a same-structured tree of logical-name tuples (or None)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(
    logical_tree, is_leaf=lambda x: x is None or isinstance(x, (tuple, P))
  )
  shapes = treedef.flatten_up_to(shapes_tree)  # type: ignore[attr-defined]
  out: list[NamedSharding] = []
  for (path, logical), shape in zip(paths, shapes):
    spec = logical_to_mesh_spec(None if logical is None else tuple(logical), rules)
    name = prefix + jax.tree_util.keystr(path)
    check_divisible(name, shape.shape, spec, mesh)
    out.append(NamedSharding(mesh, spec))
  return treedef.unflatten(out)  # type: ignore[attr-defined]


# --- activation constraints -------------------------------------------------------------------
# The model calls `constrain(x, names)`; it is a no-op unless a trainer activated a mesh, so the
# same model code runs unsharded in tests, notebooks and the export check.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
  "polylm_active_mesh", default=None
)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
  return _ACTIVE.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
    x, NamedSharding(mesh, logical_to_mesh_spec(logical, rules))
  )
