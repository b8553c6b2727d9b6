"""A minimal safetensors reader/writer on numpy (bf16 through ml_dtypes), so exporting needs no
torch.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the bytes.
Writing streams tensors chunk by chunk into shards of at most `max_shard_bytes`, with the
`model.safetensors.index.json` that transformers reads for sharded checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from typing import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I32": np.dtype(np.int32),
  "I64": np.dtype(np.int64),
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSource:
  """A tensor to write, produced lazily as chunks along its first axis (in order)."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  chunks: Callable[[], Iterator[np.ndarray]]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_sharded(
  out_dir: pathlib.Path, sources: Sequence[TensorSource], max_shard_bytes: int
) -> list[str]:
  """Writes shards of at most `max_shard_bytes` (one tensor larger than that gets a shard of its
  own) and, for several shards, the index. Headers are planned from the shapes, then each chunk is
  written as it is produced: host memory holds one chunk at a time."""
  shards: list[list[TensorSource]] = [[]]
  size = 0
  for src in sources:
    if np.dtype(src.dtype) not in CODES:
      raise ValueError(f"safetensors: tensor {src.name!r} has unsupported dtype {src.dtype}")
    if shards[-1] and size + src.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(src)
    size += src.nbytes
  n = len(shards)
  names = (
    ["model.safetensors"]
    if n == 1
    else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )
  for name, shard in zip(names, shards):
    header, offset = {}, 0
    for src in shard:
      header[src.name] = {
        "dtype": CODES[np.dtype(src.dtype)],
        "shape": list(src.shape),
        "data_offsets": [offset, offset + src.nbytes],
      }
      offset += src.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = out_dir / (name + ".partial")
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for src in shard:
        written = 0
        for chunk in src.chunks():
          chunk = np.ascontiguousarray(chunk, dtype=src.dtype)
          f.write(chunk.tobytes())
          written += chunk.nbytes
        if written != src.nbytes:
          raise ValueError(
            f"tensor {src.name}: produced {written} bytes, expected {src.nbytes} "
            f"for shape {src.shape}"
          )
    tmp.rename(out_dir / name)
  if n > 1:
    index = {
      "metadata": {"total_size": sum(s.nbytes for s in sources)},
      "weight_map": {src.name: name for name, shard in zip(names, shards) for src in shard},
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return names


def read_file(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of one safetensors file; a damaged or truncated file fails naming it."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    try:
      (length,) = struct.unpack("<Q", f.read(8))
      if 8 + length > size:
        raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
      header = json.loads(f.read(length))
      if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise ValueError(
        f"{path}: not a complete safetensors file (truncated or damaged: {e})"
      ) from e
    start = 8 + length
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      begin, end = info["data_offsets"]
      if start + end > size:
        raise ValueError(
          f"{path}: not a complete safetensors file (truncated: tensor {name!r} ends at byte "
          f"{start + end} of {size})"
        )
      f.seek(start + begin)
      arr = np.frombuffer(f.read(end - begin), DTYPES[info["dtype"]]).reshape(info["shape"])
      yield name, arr


def read_dir(model_dir: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
  index = model_dir / INDEX_NAME
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})") from e
    files = sorted(set(weight_map.values()))
    root = model_dir.resolve()
    for name in files:
      if (
        not isinstance(name, str)
        or pathlib.PurePath(name).is_absolute()
        or (model_dir / name).resolve().parent != root
      ):
        raise ValueError(f"{index}: shard file {name!r} is not a file inside {model_dir}")
  elif (model_dir / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or {INDEX_NAME}")
  for name in files:
    yield from read_file(model_dir / name)
