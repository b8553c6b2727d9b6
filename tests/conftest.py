"""Test setup: 8 host CPU devices for the sharding tests (must be set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def synthetic_batch(seed: int, batch: int, length: int, vocab: int, segments=(20, 12)):
  """Packed rows of random tokens: every row holds documents of the given lengths, then padding."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, vocab, (batch, length + 1)).astype(np.int32)
  seg = np.zeros((batch, length), np.int32)
  pos = np.zeros((batch, length), np.int32)
  start = 0
  for i, n in enumerate(segments, start=1):
    seg[:, start:start + n] = i
    pos[:, start:start + n] = np.arange(n)
    start += n
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": (seg > 0).astype(np.float32),
          "positions": pos, "segment_ids": seg}


@pytest.fixture
def make_batch():
  return synthetic_batch
