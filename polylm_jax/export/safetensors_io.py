"""A minimal safetensors reader/writer on numpy (bf16 through ml_dtypes), so exporting needs no torch.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the bytes.
Writing is tensor by tensor into shards of at most `max_shard_bytes`, with the
`model.safetensors.index.json` that transformers reads for sharded checkpoints.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I32": np.dtype(np.int32),
          "I64": np.dtype(np.int64)}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def write_file(path: pathlib.Path, tensors: list[tuple[str, np.ndarray]],
               metadata: dict[str, str] | None = None) -> None:
  header, offset = {}, 0
  for name, arr in tensors:
    if arr.dtype not in CODES:
      raise ValueError(f"safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
    header[name] = {"dtype": CODES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).tobytes())


def write_sharded(out_dir: pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
  """Writes shards as tensors arrive (memory: about one shard) and the index; returns file names."""
  shards: list[list[tuple[str, np.ndarray]]] = [[]]
  sizes = [0]
  temp_names: list[str] = []
  weight_map: dict[str, int] = {}
  total = 0

  def flush():
    name = f"shard-{len(temp_names):05d}.tmp"
    write_file(out_dir / name, shards[-1], {"format": "pt"})
    temp_names.append(name)
    shards[-1] = []
    sizes[-1] = 0

  for name, arr in tensors:
    if shards[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
      flush()
    shards[-1].append((name, arr))
    sizes[-1] += arr.nbytes
    weight_map[name] = len(temp_names)
    total += arr.nbytes
  if shards[-1]:
    flush()
  n = len(temp_names)
  if n == 1:
    final = ["model.safetensors"]
  else:
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for tmp, name in zip(temp_names, final):
    (out_dir / tmp).rename(out_dir / name)
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
  return final


def read_file(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    start = 8 + length
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if info["dtype"] not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      begin, end = info["data_offsets"]
      f.seek(start + begin)
      arr = np.frombuffer(f.read(end - begin), DTYPES[info["dtype"]]).reshape(info["shape"])
      yield name, arr


def read_dir(model_dir: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor of a (possibly sharded) safetensors checkpoint directory."""
  index = model_dir / INDEX_NAME
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (model_dir / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or {INDEX_NAME}")
  for name in files:
    yield from read_file(model_dir / name)
