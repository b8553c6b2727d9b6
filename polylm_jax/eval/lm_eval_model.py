"""The lm-evaluation-harness model `polylm_jax`: a JAX checkpoint scored and sampled directly.

    lm_eval --model polylm_jax --model_args workdir=RUN,batch_size=32 --tasks xnli_th
    (after `import polylm_jax.eval.lm_eval_model`, which registers it; `polylm-eval` does that)

Text is framed as in training (framing.py: BOS before the first token), so the numbers describe the
model the trainer trained. Tokenization follows lm-eval's own rules (`TemplateLM`: trailing context
spaces move to the continuation, the pair is encoded whole and split), so per-request
log-likelihoods equal those of lm-eval's `hf` model on the export (tested to 1e-3 in float32).
`loglikelihood_rolling` scores each document once after one BOS (the `hf` model with a BOS-adding
tokenizer scores an extra BOS after the prefix BOS; pass it `add_bos_token=False` to compare).

An instruction-tuned model (an SFT checkpoint, or its export) carries its prompt format
(chat.InstructionFormat); with lm-eval's `apply_chat_template` (`polylm-eval run --chat`) each
request is wrapped in it: a user turn becomes the format's prompt, an assistant turn (a few-shot
answer) its text and EOS, as SFT trained on them. EOS inside such text is `</s>`, which this
model's tokenization then maps to the EOS id (as transformers does for the export).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from polylm_jax import chat, sharding
from polylm_jax import framing as framing_lib
from polylm_jax.decode import generate as gen_lib
from polylm_jax.decode import loading, sampling
from polylm_jax.eval.scoring import Scorer

EOS_TEXT = "</s>"  # EOS in chat-template text, as the export's tokenizer writes it


@register_model("polylm_jax")
class PolyLMJax(TemplateLM):
  def __init__(
    self,
    workdir: str | None = None,
    step: int | None = None,
    checkpoint: str | None = None,
    hf_dir: str | None = None,
    batch_size: int | str = 16,
    mesh: str | None = None,
    max_gen_toks: int = 256,
    dtype: str | None = None,
    attention_impl: str = "auto",
    decode_layout: str = "auto",
    **unused: Any,
  ):
    super().__init__()
    if unused:
      logging.info("polylm_jax: ignoring model args %s", sorted(unused))
    mesh_obj, loaded = loading.load_to_run(
      mesh=mesh,
      dtype=dtype,
      attention_impl=attention_impl,
      workdir=workdir,
      step=int(step) if step is not None else None,
      checkpoint=checkpoint,
      hf_dir=hf_dir,
    )
    cfg, sp, rules = loaded.config, loaded.tokenizer(), sharding.DEFAULT_RULES
    self._setup(
      cfg, loaded.params, sp, mesh_obj, rules, loaded.framing, int(batch_size), decode_layout
    )
    self._generation(int(max_gen_toks), loaded.instruction_format())
    self.source = loaded.source

  @classmethod
  def from_parts(
    cls,
    config,
    params,
    tokenizer,
    *,
    mesh,
    rules=sharding.DEFAULT_RULES,
    framing: framing_lib.Framing = framing_lib.TRAINING,
    batch_size: int = 16,
    max_gen_toks: int = 256,
    decode_layout: str = "auto",
    instruction_format: chat.InstructionFormat | None = None,
  ) -> "PolyLMJax":
    """Over parameters already in memory (in-training evaluation: no export, no reload).
    `instruction_format`: the model's, for lm-eval's apply_chat_template."""
    self = cls.__new__(cls)
    TemplateLM.__init__(self)
    self._setup(config, params, tokenizer, mesh, rules, framing, batch_size, decode_layout)
    self._generation(max_gen_toks, instruction_format)
    self.source = "live parameters"
    return self

  def _setup(self, config, params, tokenizer, mesh, rules, framing, batch_size, decode_layout):
    self.config, self.sp, self.framing = config, tokenizer, framing
    self.generator = gen_lib.Generator(
      config, params, tokenizer, mesh=mesh, rules=rules, framing=framing, layout=decode_layout
    )
    # The scorer runs on the generator's layout of the parameters (no second copy).
    layout_params, head_t = self.generator.params
    self.scorer = Scorer(
      self.generator.run_config,
      layout_params,
      mesh=mesh,
      rules=rules,
      batch_size=batch_size,
      head_t=head_t,
    )
    self.batch_size = self.scorer.batch_size
    self.show_progress = True

  def _generation(self, max_gen_toks: int, instruction_format) -> None:
    self.max_gen_toks = max_gen_toks
    self.instruction_format = instruction_format

  def set_params(self, params) -> None:
    """New parameters of the same shapes and shardings (compiled programs are kept)."""
    self.generator.set_params(params)
    self.scorer.params, self.scorer.head_t = self.generator.params

  def measure_speed(self, length: int = 64) -> float:
    """Scored requests per second on one batch of `length` tokens (compiled first, so the figure
    is the steady rate a benchmark run will see at that length)."""
    length = min(length, self.max_length)
    items = [
      ([framing_lib.BOS_ID] + [3] * (length - 1), [3] * length, length // 2)
    ] * self.scorer.batch_size
    self.scorer.score(items)
    began = time.perf_counter()
    self.scorer.score(items)
    return len(items) / (time.perf_counter() - began)

  # --- tokenization (TemplateLM) ------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return framing_lib.EOS_ID

  @property
  def prefix_token_id(self) -> int:
    return framing_lib.BOS_ID if self.framing.bos else framing_lib.EOS_ID

  @property
  def max_length(self) -> int:
    return self.config.max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    if self.instruction_format is not None and EOS_TEXT in string:
      ids: list[int] = []
      for i, part in enumerate(string.split(EOS_TEXT)):
        ids += ([framing_lib.EOS_ID] if i else []) + self.sp.encode(part)
    else:
      ids = self.sp.encode(string)
    return ids if add_special_tokens is False else self.framing.prompt(ids)

  # --- chat (lm-eval's apply_chat_template) --------------------------------------------------
  @property
  def tokenizer_name(self) -> str:
    return "polylm_jax"

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self.instruction_format.chat_template() if self.instruction_format else ""

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    """The conversation in the model's instruction format (BOS comes from tok_encode). A system
    message goes before the next user turn's instruction, on a line of its own."""
    if self.instruction_format is None:
      raise ValueError(
        f"{getattr(self, 'source', 'this model')} is not instruction-tuned (no instruction "
        f"format in its checkpoint, no chat template in its export): evaluate it without a "
        f"chat template"
      )
    text, system = "", ""
    for i, message in enumerate(chat_history):
      role, content = message["role"], message["content"]
      if role == "system":
        system += content + "\n"
      elif role == "user":
        text += self.instruction_format.prompt.format(instruction=system + content)
        system = ""
      elif role == "assistant":
        prefill = not add_generation_prompt and i == len(chat_history) - 1
        text += content + ("" if prefill else EOS_TEXT)
      else:
        raise ValueError(f"chat message role {role!r}: expected system, user or assistant")
    return text

  def tok_decode(self, tokens, **kwargs) -> str:
    return self.sp.decode(list(tokens))

  # --- requests ------------------------------------------------------------------------------
  def _progress(self, total: int, desc: str, disable: bool):
    return tqdm(total=total, desc=desc, disable=disable or not self.show_progress)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    limit = self.max_length
    items = []
    for _, context_enc, continuation_enc in requests:
      whole = (list(context_enc) + list(continuation_enc))[-(limit + 1) :]
      inputs, targets = whole[:-1], whole[1:]
      items.append((inputs, targets, len(inputs) - len(continuation_enc)))
    with self._progress(len(items), "polylm_jax loglikelihood", disable_tqdm) as bar:
      scored = self._timed(items, bar)
    return [(s.logprob, s.greedy) for s in scored]

  def _timed(self, items, bar):
    """Scores, logging a time estimate from the first batch before the rest runs."""
    if len(items) <= self.batch_size:
      return self.scorer.score(items, progress=bar)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    first = [items[i] for i in order[: self.batch_size]]
    began = time.perf_counter()
    head = self.scorer.score(first, progress=bar)
    took = time.perf_counter() - began
    logging.info(
      "polylm_jax: first batch of %d requests took %.1f s (compile included); about "
      "%.0f s more for the other %d",
      len(first),
      took,
      took * (len(items) - len(first)) / len(first),
      len(items) - len(first),
    )
    rest = self.scorer.score([items[i] for i in order[self.batch_size :]], progress=bar)
    out: list[Any] = [None] * len(items)
    for i, s in zip(order, head + rest):
      out[i] = s
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    items, owner = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      windows = map(
        lm_utils.make_disjoint_window,
        lm_utils.get_rolling_token_windows(
          token_list=self.sp.encode(string),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length,
          context_len=1,
        ),
      )
      for context, continuation in windows:
        whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
        inputs, targets = whole[:-1], whole[1:]
        items.append((inputs, targets, len(inputs) - len(continuation)))
        owner.append(index)
    with self._progress(len(items), "polylm_jax loglikelihood_rolling", disable_tqdm) as bar:
      scored = self._timed(items, bar)
    totals = [0.0] * len(requests)
    for index, s in zip(owner, scored):
      totals[index] += s.logprob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests grouped by their generation settings (stop strings, length, sampling), each
    group in batches of similar prompt lengths; answers in the requests' order."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    with self._progress(len(requests), "polylm_jax generate_until", disable_tqdm) as bar:
      for indices in groups.values():
        kwargs = dict(requests[indices[0]].args[1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = (
          float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        )
        config = sampling.SamplingConfig(
          temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0))
        )
        # As lm-eval's hf model: the context keeps its last (context - max_gen_toks) tokens.
        keep = max(1, self.max_length - max_new)
        prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] for i in indices}
        # Longest first: a batch's prompts are of similar lengths (little padding, few shapes).
        indices = sorted(indices, key=lambda i: (-len(prompts[i]), i))
        for begin in range(0, len(indices), self.batch_size):
          chunk = indices[begin : begin + self.batch_size]
          results = self.generator.generate(
            [prompts[i] for i in chunk], max_new_tokens=max_new, stop=until, sampling_config=config
          )
          for i, r in zip(chunk, results):
            out[i] = r.text
            self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
          bar.update(len(chunk))
    return out  # type: ignore[return-value]
