"""A model to run, from any of the places a user has one: a training workdir (its newest or a
chosen step), a checkpoint step directory, or an exported Hugging Face directory.

Parameters are placed straight into the mesh's shardings (read per shard from Orbax, or put from
host memory for an export); the tokenizer comes with the model (checkpoint metadata or
`tokenizer.model`) and must fit its vocabulary.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
from jax.sharding import Mesh

from polylm_jax import chat, framing, sharding
from polylm_jax.config import ModelConfig
from polylm_jax.errors import CorruptCheckpointError
from polylm_jax.io import storage
from polylm_jax.model import params as model_params


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  params: Any  # placed on the mesh
  tokenizer_model: bytes  # a serialized SentencePiece model
  source: str
  meta: dict[str, Any]  # checkpoint metadata (empty for an export)
  framing: framing.Framing
  chat_template: str = ""  # an export's (its tokenizer config's), if it has one

  def tokenizer(self):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=self.tokenizer_model)

  def instruction_format(self) -> chat.InstructionFormat | None:
    """The prompt format an instruction-tuned model was trained with (None for one that is
    not instruction-tuned)."""
    return instruction_format_of(self.source, self.meta, self.chat_template)


def instruction_format_of(
  source: str, meta: dict[str, Any], chat_template: str
) -> chat.InstructionFormat | None:
  """An SFT checkpoint's format is in its metadata; an export's is read back from its chat
  template (the one polylm-export writes)."""
  if meta.get("instruction_format"):
    return chat.InstructionFormat(**meta["instruction_format"])
  if chat_template:
    fmt = chat.format_of_chat_template(chat_template)
    if fmt is None:
      raise ValueError(
        f"{source}: tokenizer_config.json's chat_template is not one polylm-export writes, so "
        f"its instruction format is unknown"
      )
    return fmt
  return None


def export_chat_template(hf_dir: str | pathlib.Path) -> str:
  """The chat template in an export's tokenizer config ("" without one)."""
  path = pathlib.Path(hf_dir) / "tokenizer_config.json"
  return (json.loads(path.read_text()).get("chat_template") or "") if path.is_file() else ""


def check_chat(source: str, meta: dict[str, Any], chat_template: str) -> chat.InstructionFormat:
  """The instruction format of a model asked for in it (--chat): it must be instruction-tuned."""
  fmt = instruction_format_of(source, meta, chat_template)
  if fmt is None:
    raise ValueError(
      f"--chat: {source} is not instruction-tuned (its checkpoint records no instruction "
      f"format; an export of one has a chat template); evaluate it without --chat"
    )
  return fmt


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules) -> Any:
  return sharding.tree_shardings(
    model_params.logical_axes(cfg), model_params.abstract_params(cfg), mesh, rules, prefix="params"
  )


def load(
  *,
  workdir: str | None = None,
  step: int | None = None,
  checkpoint: str | None = None,
  hf_dir: str | None = None,
  mesh: Mesh,
  rules=sharding.DEFAULT_RULES,
  overrides: dict[str, Any] | None = None,
) -> LoadedModel:
  """`overrides`: ModelConfig fields to change for running (e.g. dtype, attention_impl)."""
  given = [x for x in (workdir, checkpoint, hf_dir) if x]
  if len(given) != 1:
    raise ValueError(
      "give exactly one of a training workdir (--workdir), a checkpoint step "
      "directory (--checkpoint) or a Hugging Face directory (--hf_dir)"
    )
  if hf_dir:
    return _load_export(pathlib.Path(hf_dir), mesh, rules, overrides or {})
  from polylm_jax.checkpoint import on_disk
  from polylm_jax.checkpoint.manager import restore_params

  step_dir, meta = peek(workdir=workdir, step=step, checkpoint=checkpoint)
  if "model_config" not in meta:
    raise ValueError(f"{step_dir}: checkpoint metadata has no model_config")
  cfg = ModelConfig.from_dict(meta["model_config"]).replace(**(overrides or {}))
  if "tokenizer_model_b64" not in meta:
    raise ValueError(f"{step_dir}: checkpoint metadata has no tokenizer model")
  sp_bytes = base64.b64decode(meta["tokenizer_model_b64"])
  check_tokenizer(sp_bytes, cfg, str(step_dir))
  try:
    params = restore_params(step_dir, cfg, param_shardings(cfg, mesh, rules))
  except CorruptCheckpointError as e:
    steps = on_disk.complete_steps(workdir) if workdir else []
    earlier = [s for s in steps if s < meta.get("step", 0)]
    if earlier:
      raise CorruptCheckpointError(f"{e}; the previous checkpoint: --step={earlier[-1]}") from e
    raise
  logging.info("loaded %s (step %s, %s)", step_dir, meta.get("step"), cfg.name)
  return LoadedModel(cfg, params, sp_bytes, str(step_dir), meta, framing.from_meta(meta))


def peek(
  *,
  workdir: str | None = None,
  step: int | None = None,
  checkpoint: str | None = None,
  hf_dir: str | None = None,
) -> tuple[str, dict[str, Any]]:
  """(source, metadata) of the model `load` would load, without reading its parameters: the
  checkpoint step directory and its metadata (the newest step of a workdir unless `step`), or an
  export's directory and {}."""
  if hf_dir:
    return str(pathlib.Path(hf_dir)), {}
  from polylm_jax.checkpoint import on_disk

  step_dir = on_disk.resolve_checkpoint(workdir, step, checkpoint)
  return str(step_dir), json.loads(storage.read_text(storage.join(step_dir, "meta", "metadata")))


def _load_export(hf_dir: pathlib.Path, mesh, rules, overrides) -> LoadedModel:
  from polylm_jax.export import hf_export

  cfg = hf_export.config_from_hf(hf_dir, **overrides)
  sp_path = hf_dir / "tokenizer.model"
  if not sp_path.is_file():
    raise FileNotFoundError(
      f"--hf_dir={hf_dir}: no tokenizer.model (a SentencePiece model is "
      f"needed to turn text into ids)"
    )
  sp_bytes = sp_path.read_bytes()
  check_tokenizer(sp_bytes, cfg, str(hf_dir))
  template = export_chat_template(hf_dir)
  host = hf_export.import_params(hf_dir, cfg, scanned=cfg.scan_layers)
  params = jax.device_put(host, param_shardings(cfg, mesh, rules))
  return LoadedModel(
    cfg, params, sp_bytes, str(hf_dir), {}, framing.from_export(hf_dir), chat_template=template
  )


def load_to_run(
  *,
  mesh: str | None,
  dtype: str | None = None,
  attention_impl: str = "auto",
  workdir: str | None = None,
  step: int | None = None,
  checkpoint: str | None = None,
  hf_dir: str | None = None,
) -> tuple[Mesh, LoadedModel]:
  """What polylm-generate, polylm-eval and the lm-eval model run: the mesh (`data,fsdp,tensor`
  sizes; empty: every device on data) and the model placed on it, with the matmul `dtype` (None:
  the model's) and the prefill's attention as asked, kernels compiled, never interpreted."""
  mesh_obj = sharding.make_mesh(sharding.parse_mesh(mesh))
  overrides: dict[str, Any] = {"attention_impl": attention_impl, "attention_interpret": False}
  if dtype:
    overrides["dtype"] = dtype
  loaded = load(
    workdir=workdir,
    step=step,
    checkpoint=checkpoint,
    hf_dir=hf_dir,
    mesh=mesh_obj,
    overrides=overrides,
  )
  return mesh_obj, loaded


def check_tokenizer(sp_bytes: bytes, cfg: ModelConfig, where: str) -> None:
  import sentencepiece as spm

  try:
    size = spm.SentencePieceProcessor(model_proto=sp_bytes).vocab_size()
  except Exception as e:  # noqa: BLE001 (any parse failure: say which file)
    raise ValueError(f"{where}: the tokenizer model cannot be read ({e})") from e
  if size > cfg.vocab_size:
    raise ValueError(
      f"{where}: the tokenizer has {size} ids but the model's vocabulary is "
      f"{cfg.vocab_size}; this tokenizer does not belong to this model"
    )
