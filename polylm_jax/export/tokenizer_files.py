"""The tokenizer files of an export: the SentencePiece model and the config with which
transformers loads it (Llama-style tokenizer, BOS added as training framed documents, no automatic
EOS, eos id 2), and the model card."""

from __future__ import annotations

import json
import pathlib

from polylm_jax import framing

TOKENIZER_CONFIG = {
  "tokenizer_class": "LlamaTokenizer",
  # add_bos_token: set from the checkpoint's framing (framing.py), BOS as in training.
  "add_eos_token": False,
  "bos_token": "<s>",
  "eos_token": "</s>",
  "unk_token": "<unk>",
  # legacy + no prefix space: encode exactly as sentencepiece does (our model has no dummy prefix).
  "legacy": True,
  "add_prefix_space": False,
  "clean_up_tokenization_spaces": False,
}


def write_tokenizer(
  out: pathlib.Path,
  sp_model: bytes,
  model_max_length: int,
  doc_framing: framing.Framing = framing.TRAINING,
  instruction_format: dict | None = None,
) -> None:
  """transformers then tokenizes a text exactly as the model was trained on it: BOS first when
  training framed documents with BOS, no EOS (a prompt is an unfinished document). An
  instruction-tuned model also gets the chat template of its training format (chat.py), so
  `apply_chat_template` and vLLM's chat endpoint build the prompts it was trained on."""
  (out / "tokenizer.model").write_bytes(sp_model)
  config = dict(TOKENIZER_CONFIG, model_max_length=model_max_length, add_bos_token=doc_framing.bos)
  if instruction_format is not None:
    from polylm_jax import chat

    config["chat_template"] = chat.InstructionFormat(**instruction_format).chat_template()
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out / "special_tokens_map.json").write_text(
    json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
  )


def _data_lines(meta: dict, data: dict) -> list[str]:
  if meta.get("curriculum"):  # the table of curriculum.Curriculum.table: one line per stage
    stages = meta["curriculum"].strip().splitlines()
    return [f"- data: a language curriculum of {len(stages)} stage(s):"] + [
      f"  - {line}" for line in stages
    ]
  return [f"- data mixture: `{data.get('mixture', 'unknown')}`"]


def write_model_card(out: pathlib.Path, meta: dict, dtype: str, source: str) -> None:
  cfg = meta["model_config"]
  data = meta.get("data_config", {})
  step = meta.get("step")
  tokens = (
    step * data["batch_size"] * data["seq_len"]
    if step is not None and "batch_size" in data
    else None
  )
  lines = [
    "---",
    "library_name: transformers",
    "pipeline_tag: text-generation",
    "---",
    "",
    f"# {cfg['name']} (polylm-jax export)",
    "",
    "A PolyLM-architecture decoder (GPT-2 layout) trained with polylm-jax and exported for "
    "`transformers.AutoModelForCausalLM` (no custom code).",
    "",
    "## Provenance",
    "",
    f"- source checkpoint: `{source}`",
    f"- training steps: {step}",
    f"- tokens seen (steps x global batch x sequence length): {tokens:,}"
    if tokens is not None
    else "- tokens seen: unknown",
    *_data_lines(meta, data),
    f"- layers {cfg['num_layers']}, d_model {cfg['d_model']}, heads {cfg['num_heads']}, "
    f"vocab {cfg['vocab_size']}, positions {cfg['max_length']}",
    f"- exported dtype: {dtype}",
    "",
    "## Prompting",
    "",
    "The tokenizer adds BOS (as every training document began) and no EOS; instruction-tuned "
    "PolyLM models are prompted with "
    '`"{instruction}\\n\\n"`.',
    "",
    "## Training configuration (gin)",
    "",
    "```",
    meta.get("gin_config", "").rstrip(),
    "```",
    "",
  ]
  (out / "README.md").write_text("\n".join(lines))
