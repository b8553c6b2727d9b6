"""The instruction-tuned prompt format: one definition for SFT data, generation and exports.

PolyLM-MultiAlpaca is prompted with `"{instruction}\\n\\n"` and answers after it. A record here is a
list of turns (an Alpaca record is one turn): each turn is the prompt (`InstructionFormat.prompt`,
or `prompt_with_input` when the turn has an `input`), then the response, then EOS. A conversation
is its turns one after the other, so a chat's history is `BOS q1\\n\\n a1 EOS q2\\n\\n` and the
model
answers q2 and stops at EOS, exactly as it was trained.

Prompt and response are tokenized separately and their ids concatenated: the model learns to
continue from the prompt's own ids, which is what it gets at inference. SFT weights are 0 on
prompt tokens and 1 on response tokens and each turn's EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from polylm_jax import framing
from polylm_jax.typecheck import check_fields


@dataclasses.dataclass(frozen=True)
class InstructionFormat:
  """gin `InstructionFormat`. The default is PolyLM-MultiAlpaca's released format; a record's
  `input`, when not empty, goes on the line after the instruction."""

  prompt: str = "{instruction}\n\n"
  prompt_with_input: str = "{instruction}\n{input}\n\n"

  def __post_init__(self):
    check_fields(self)
    if "{instruction}" not in self.prompt or "{instruction}" not in self.prompt_with_input:
      raise ValueError("InstructionFormat.prompt and prompt_with_input must contain {instruction}")
    if "{input}" not in self.prompt_with_input:
      raise ValueError("InstructionFormat.prompt_with_input must contain {input}")

  def render(self, instruction: str, input_text: str = "") -> str:
    if input_text.strip():
      return self.prompt_with_input.format(instruction=instruction, input=input_text)
    return self.prompt.format(instruction=instruction)

  def to_meta(self) -> dict[str, str]:
    return dataclasses.asdict(self)

  def chat_template(self) -> str:
    """A transformers/vLLM chat template producing the training ids: BOS, then per user turn the
    prompt, per assistant turn its text and EOS. A user message's text is the instruction
    (an `input` is not a chat concept). `add_generation_prompt` adds nothing: the prompt already
    ends where the answer starts."""
    prompt = self.prompt.replace("{instruction}", "' + message['content'] + '")
    prompt = "'" + prompt.replace("\n", "\\n") + "'"
    return (
      "{{ bos_token }}{% for message in messages %}"
      "{% if message['role'] == 'user' %}{{ " + prompt + " }}"
      "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
      "{% endif %}{% endfor %}"
    )


_USER = "{% if message['role'] == 'user' %}{{ "
_CONTENT = " + message['content'] + "


def format_of_chat_template(template: str) -> InstructionFormat | None:
  """The InstructionFormat whose `chat_template()` is `template` (an export's tokenizer config);
  None for any other template."""
  head, found, rest = template.partition(_USER)
  body = rest.partition(" }}{% elif")[0]
  if not found or _CONTENT not in body:
    return None
  before, _, after = body.partition(_CONTENT)
  quoted = (before, after)
  if not all(len(q) >= 2 and q[0] == q[-1] == "'" for q in quoted):
    return None
  pre, post = (q[1:-1].replace("\\n", "\n") for q in quoted)
  prompt = pre + "{instruction}" + post
  try:
    fmt = InstructionFormat(prompt=prompt)
  except ValueError:
    return None
  return fmt if fmt.chat_template() == template else None


@dataclasses.dataclass(frozen=True)
class Turn:
  instruction: str
  output: str = ""
  input: str = ""


def encode_turns(
  sp,
  turns: Sequence[Turn],
  fmt: InstructionFormat = InstructionFormat(),
  *,
  answer_last: bool = True,
) -> tuple[list[int], list[float]]:
  """(ids, weights) of a conversation, BOS first. With `answer_last=False` the last turn's
  response is left out (a prompt to generate from)."""
  ids: list[int] = [framing.BOS_ID]
  weights: list[float] = [0.0]
  for i, turn in enumerate(turns):
    prompt = sp.encode(fmt.render(turn.instruction, turn.input))
    ids += prompt
    weights += [0.0] * len(prompt)
    if i == len(turns) - 1 and not answer_last:
      break
    response = sp.encode(turn.output) + [framing.EOS_ID]
    ids += response
    weights += [1.0] * len(response)
  return ids, weights


def chat_prompt_ids(
  sp, history: Sequence[tuple[str, str]], message: str, fmt: InstructionFormat = InstructionFormat()
) -> list[int]:
  """The ids to generate the answer to `message` from, after (question, answer) `history`."""
  turns = [Turn(q, a) for q, a in history] + [Turn(message)]
  return encode_turns(sp, turns, fmt, answer_last=False)[0]


# PolyLM's released demo sampling settings; an instruction-tuned export defaults to them.
DEMO_GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.02}
