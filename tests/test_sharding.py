"""Sharded training on 8 host CPU devices: same numbers on every mesh, parameters placed by the
rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from runs import tiny_step

from polylm_jax import sharding
from polylm_jax.config import PRESETS
from polylm_jax.model import params as model_params
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.trainer.step import TrainStep

TINY = PRESETS["tiny"]
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def _run(mesh_shape, make_batch, steps=3):
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), devices)
  step = tiny_step(mesh=mesh)
  state = step.init(seed=0)
  losses = []
  for i in range(steps):
    state, metrics = step(state, step.place_batch(make_batch(i, 8, 32, TINY.vocab_size)))
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def runs():
  from tests.conftest import synthetic_batch

  return {shape: _run(shape, synthetic_batch) for shape in MESHES}


@pytest.mark.parametrize("shape", MESHES[1:])
def test_same_losses_and_params_on_every_mesh(runs, shape):
  ref_losses, ref_state = runs[(1, 1, 1)]
  losses, state = runs[shape]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # atol: Adam divides by sqrt(v) + 1e-8, so coordinates whose gradient is ~1e-8 turn
  # reduction-order rounding into update differences; 5e-8 is < 0.1% of one update (lr 6e-5).
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-8),
    jax.device_get(state.params),
    jax.device_get(ref_state.params),
  )


@pytest.mark.parametrize("shape", MESHES)
def test_parameters_and_optimizer_state_sharded_by_the_rules(runs, shape):
  _, state = runs[shape]
  axes = {"data": shape[0], "fsdp": shape[1], "tensor": shape[2]}
  logical = jax.tree_util.tree_leaves_with_path(
    model_params.logical_axes(TINY), is_leaf=lambda x: isinstance(x, tuple)
  )
  arrays = jax.tree.leaves(state.params)
  for (path, names), arr in zip(logical, arrays):
    expected = sharding.logical_to_mesh_spec(names, sharding.DEFAULT_RULES)
    assert arr.sharding.spec == expected, jax.tree_util.keystr(path)
    # ... and really split: each device holds 1/(product of its mesh axes) of the tensor.
    parts = int(np.prod([axes[a] for a in jax.tree.leaves(tuple(expected))]))
    shard = arr.addressable_shards[0].data
    assert shard.size * parts == arr.size, jax.tree_util.keystr(path)
  wte = state.params["wte"]
  assert wte.sharding.spec == P("tensor", "fsdp")
  mu = state.opt_state[1].mu
  assert mu["wte"].sharding.spec == wte.sharding.spec
  assert mu["blocks"]["mlp"]["fc_kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_mesh_sizes_that_do_not_fit_fail_before_compiling():
  with pytest.raises(ValueError, match=r"data\*fsdp\*tensor = 6 but there are 8 devices"):
    sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="only one axis may be -1"):
    sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=-1))
  with pytest.raises(ValueError, match="MeshConfig.data=-1 cannot be resolved"):
    sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=3))
  assert dict(sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2)).shape) == {
    "data": 4,
    "fsdp": 2,
    "tensor": 1,
  }
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=8))
  with pytest.raises(
    ValueError,
    match=r"splits attention heads 8 ways \(rule 'heads' -> mesh axes "
    r"\('tensor',\)\), which does not divide "
    r"ModelConfig.num_heads=4",
  ):
    tiny_step(mesh=mesh)
  # The checks follow the rules, not the mesh axis names: heads over fsdp are checked there.
  fsdp = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
  moved = sharding.MeshConfig(
    rule_overrides={"heads": "fsdp", "activation_heads": "fsdp", "embed": None}
  ).effective_rules
  with pytest.raises(ValueError, match=r"rule 'heads' -> mesh axes \('fsdp',\)"):
    TrainStep(
      model_config=TINY,
      optimizer_config=OptimizerConfig(warmup_steps=1),
      mesh=fsdp,
      rules=moved,
      total_steps=10,
    )


def test_indivisible_parameter_names_the_tensor():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8, tensor=1))
  wide = TINY.replace(d_model=68, num_heads=4)  # embed=68 cannot split 8 ways over fsdp
  with pytest.raises(ValueError, match=r"params\['blocks'\].*size 68.*fsdp"):
    TrainStep(
      model_config=wide,
      optimizer_config=OptimizerConfig(warmup_steps=1),
      mesh=mesh,
      rules=sharding.DEFAULT_RULES,
      total_steps=10,
    )


def test_rules_are_data():
  assert sharding.logical_to_mesh_spec(
    ("activation_batch", "activation_length"), sharding.DEFAULT_RULES
  ) == P(("data", "fsdp"), None)
  with pytest.raises(KeyError, match="'experts' has no rule"):
    sharding.logical_to_mesh_spec(("experts",), sharding.DEFAULT_RULES)
  with pytest.raises(ValueError, match="map mesh axis 'tensor' twice"):
    sharding.logical_to_mesh_spec(("heads", "mlp"), sharding.DEFAULT_RULES)
  custom = tuple((k, None) if k == "embed" else (k, v) for k, v in sharding.DEFAULT_RULES)
  assert sharding.logical_to_mesh_spec(("vocab", "embed"), custom) == P("tensor", None)
  # Single rules change (or are added) without restating the table; duplicates are refused.
  config = sharding.MeshConfig(rule_overrides={"embed": None, "experts": "tensor"})
  assert dict(config.effective_rules)["embed"] is None
  assert sharding.logical_to_mesh_spec(("experts",), config.effective_rules) == P("tensor")
  assert dict(config.effective_rules)["vocab"] == "tensor"
  with pytest.raises(ValueError, match=r"names \['embed'\] more than once"):
    sharding.MeshConfig(rules=sharding.DEFAULT_RULES + (("embed", None),))
  with pytest.raises(ValueError, match=r"'model' not mesh axes|\['model'\] not mesh axes"):
    sharding.MeshConfig(rule_overrides={"embed": "model"})
