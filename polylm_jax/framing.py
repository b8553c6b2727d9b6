"""How a document becomes tokens: one decision shared by training, decoding, evaluation and export.

Training packs every document as BOS + its tokens + EOS (data/packing.py), so the model has always
seen BOS before the first token of a text. Scoring or generating without it (what transformers,
vLLM and lm-eval do when a tokenizer adds no BOS) shifts every number a little: a train/serve
skew. So the framing is recorded in each checkpoint (`meta["framing"]`), the JAX decoder and the
lm-eval model frame prompts from it, and an export's tokenizer config adds BOS exactly when
training did (`add_bos_token`), so transformers and vLLM tokenize prompts to the same ids.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

PAD_ID = 0  # also <unk>: SentencePiece models of this project have no separate pad piece
BOS_ID = 1
EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class Framing:
  bos: bool = True  # every document (and so every prompt) starts with BOS
  eos: bool = True  # every training document ends with EOS (generation stops at it)

  def prompt(self, ids: Sequence[int]) -> list[int]:
    """The ids a prompt is scored or continued from."""
    return ([BOS_ID] if self.bos else []) + list(ids)

  def to_meta(self) -> dict[str, bool]:
    return dataclasses.asdict(self)


TRAINING = Framing()  # what data/packing.py does


def from_meta(meta: dict[str, Any]) -> Framing:
  """A checkpoint's framing; checkpoints written before it was recorded were trained with BOS."""
  return Framing(**meta.get("framing", TRAINING.to_meta()))


def from_export(hf_dir: str | pathlib.Path) -> Framing:
  """An export's framing, as its tokenizer config makes transformers tokenize (LlamaTokenizer
  adds BOS unless `add_bos_token` is false)."""
  path = pathlib.Path(hf_dir) / "tokenizer_config.json"
  config = json.loads(path.read_text()) if path.is_file() else {}
  return Framing(bos=bool(config.get("add_bos_token", True)))
