"""`polylm-generate`: text from a training workdir, a checkpoint or a Hugging Face export.

  polylm-generate --workdir=RUN --prompt="Translate to German: Good morning"
  polylm-generate --workdir=RUN --step=20000 --prompts=in.jsonl --output=out.jsonl
  polylm-generate --hf_dir=hf/my-polylm --chat --demo_sampling

One prompt streams its tokens to the terminal as they are produced; a JSONL file of prompts
({"prompt": ...} per line, other fields kept) is generated in batches and written as JSONL with
"completion" and "finish_reason" added; --chat is an interactive loop whose turns are joined in the
instruction-tuned format the model was trained with (polylm_jax/chat.py: BOS, each turn
"{instruction}\\n\\n", each answer ended by EOS).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from polylm_jax import console, decode, errors
from polylm_jax.io import disk


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="polylm-generate",
    description=console.summary(__doc__),
  )
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (newest checkpoint unless --step)")
  src.add_argument("--checkpoint", help="a checkpoint step directory, RUN/checkpoints/<step>")
  src.add_argument("--hf_dir", help="an exported Hugging Face directory (polylm-export)")
  parser.add_argument(
    "--step", type=_positive, default=None, help="which checkpoint of --workdir (default: newest)"
  )
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", help="one prompt; its completion streams to stdout")
  what.add_argument("--prompts", help='a JSONL file of {"prompt": ...} records')
  what.add_argument("--chat", action="store_true", help="an interactive chat loop")
  parser.add_argument("--output", help="JSONL output for --prompts (default: stdout)")
  parser.add_argument(
    "--max_new_tokens",
    type=_positive,
    default=256,
    help="tokens to generate at most per prompt (default: 256)",
  )
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
  parser.add_argument(
    "--top_k", type=int, default=0, help="sample from the k likeliest tokens (default: 0, all)"
  )
  parser.add_argument(
    "--top_p", type=float, default=1.0, help="nucleus sampling probability mass (default: 1.0)"
  )
  parser.add_argument(
    "--repetition_penalty",
    type=float,
    default=1.0,
    help="divides the logits of tokens already in the text (default: 1.0, none)",
  )
  parser.add_argument(
    "--demo_sampling",
    action="store_true",
    help="PolyLM's released demo settings: temperature 0.7, top_p 0.8, "
    "repetition penalty 1.02 (overrides the three flags)",
  )
  parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
  parser.add_argument(
    "--stop",
    action="append",
    default=[],
    help="a stop string (repeatable); the completion is cut before it",
  )
  parser.add_argument(
    "--truncate_prompt",
    choices=["error", "left"],
    default="error",
    help="a prompt longer than the context: refuse, or drop its oldest tokens (default: error)",
  )
  parser.add_argument(
    "--batch_size", type=_positive, default=16, help="prompts per batch (--prompts; default: 16)"
  )
  parser.add_argument(
    "--mesh", default="", help="data,fsdp,tensor sizes, e.g. 1,1,8 (default: all devices on data)"
  )
  parser.add_argument(
    "--dtype",
    default=None,
    choices=["float32", "bfloat16", "float16"],
    help="matmul dtype (default: the model's)",
  )
  parser.add_argument(
    "--attention_impl",
    default="auto",
    help="attention for the prefill: auto, xla, pallas_gpu, pallas_tpu, cudnn (default: auto)",
  )
  add_layout_flag(parser)
  return parser


def _positive(text: str) -> int:
  """An argparse type: a whole number >= 1 (checked before any model is loaded)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} must be >= 1")
  return value


def add_layout_flag(parser) -> None:
  parser.add_argument(
    "--decode_layout",
    choices=decode.LAYOUTS,
    default="auto",
    help="weights and KV cache while decoding: scan (stacked layers, the training layout), "
    "unrolled (one array per layer and a transposed LM head: faster on CPU, one more copy of "
    "the weights); auto (the default): unrolled on CPU, scan elsewhere",
  )


def _sampling(args):
  from polylm_jax.decode.sampling import SamplingConfig

  if args.demo_sampling:
    return SamplingConfig.demo(seed=args.seed)
  return SamplingConfig(
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    repetition_penalty=args.repetition_penalty,
    seed=args.seed,
  )


class _Stream:
  """Prints one row's text as its tokens arrive (only the part that is complete UTF-8)."""

  def __init__(self, sp, out=None):
    # sys.stdout when called, not when imported: it may have been replaced since.
    self.sp, self.out, self.ids, self.shown = sp, out or sys.stdout, [], ""

  def __call__(self, row: int, ids: list[int]) -> None:
    self.ids.extend(t for t in ids if t != 2)
    text = self.sp.decode(self.ids)
    if text.endswith("\ufffd"):  # a byte-fallback character still incomplete
      return
    self.out.write(text[len(self.shown) :])
    self.out.flush()
    self.shown = text


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  console.quiet_logging()  # Orbax and absl INFO lines stay out of the console
  console.choose_platform()  # no failed TPU probe on a machine without one
  import jax

  from polylm_jax.decode import generate, loading

  try:
    sampling_config = _sampling(args)
    mesh, loaded = loading.load_to_run(
      mesh=args.mesh,
      dtype=args.dtype,
      attention_impl=args.attention_impl,
      workdir=args.workdir,
      step=args.step,
      checkpoint=args.checkpoint,
      hf_dir=args.hf_dir,
    )
  except errors.PolyLMError as e:  # a damaged or unreadable checkpoint: 1; a bad setting: 2
    print(f"polylm-generate: {e}", file=sys.stderr)
    return e.exit_status
  except (ValueError, FileNotFoundError) as e:
    print(f"polylm-generate: {e}", file=sys.stderr)
    return 2
  sp = loaded.tokenizer()
  gen = generate.Generator(
    loaded.config,
    loaded.params,
    sp,
    mesh=mesh,
    framing=loaded.framing,
    layout=args.decode_layout,
  )
  loaded.params = None  # the generator holds its own layout: no second copy stays alive
  truncate = "left" if args.truncate_prompt == "left" else None
  common = dict(
    max_new_tokens=args.max_new_tokens,
    sampling_config=sampling_config,
    stop=args.stop,
    truncate=truncate,
  )
  logging.info(
    "generating with %s on %d %s device(s)",
    loaded.source,
    mesh.devices.size,
    jax.devices()[0].platform,
  )
  try:
    if args.prompt is not None:
      stream = _Stream(sp)
      [done] = gen.generate([args.prompt], on_tokens=stream, chunk=1, **common)
      print(f"\n[{done.finish_reason}, {len(done.token_ids)} tokens]", file=sys.stderr)
    elif args.prompts:
      _jsonl(gen, args, common)
    else:
      from polylm_jax import chat

      fmt = chat.InstructionFormat(**loaded.meta.get("instruction_format", {}))
      _chat(gen, sp, fmt, common)
  except generate.PromptTooLongError as e:
    print(f"polylm-generate: {e}", file=sys.stderr)
    return 2
  return 0


def _jsonl(gen, args, common) -> None:
  path = pathlib.Path(args.prompts)
  records = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError as e:
      raise SystemExit(f"polylm-generate: {path}:{n}: not JSON ({e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise SystemExit(f'polylm-generate: {path}:{n}: no "prompt" string field')
    records.append(record)
  lines = []
  for begin in range(0, len(records), args.batch_size):
    batch = records[begin : begin + args.batch_size]
    for record, done in zip(batch, gen.generate([r["prompt"] for r in batch], **common)):
      lines.append(
        json.dumps(
          dict(record, completion=done.text, finish_reason=done.finish_reason), ensure_ascii=False
        )
      )
    logging.info("%d / %d prompts", min(begin + args.batch_size, len(records)), len(records))
  text = "".join(line + "\n" for line in lines)
  if args.output:
    disk.atomic_write_text(args.output, text)
  else:
    sys.stdout.write(text)


def _chat(gen, sp, fmt, common) -> None:
  from polylm_jax.chat import chat_prompt_ids

  # Compile (and log what `auto` chose for) the first turn's shapes before the first prompt, so
  # no log line lands in the conversation; later turns log only warnings.
  gen.generate([chat_prompt_ids(sp, [], "Hi", fmt)], **dict(common, max_new_tokens=2), chunk=1)
  print(
    "polylm-generate chat: empty line or Ctrl-D to quit, /reset to forget the conversation",
    file=sys.stderr,
  )
  with console.only_warnings():
    _converse(gen, sp, fmt, common)


def _converse(gen, sp, fmt, common) -> None:
  from polylm_jax.chat import chat_prompt_ids

  history: list[tuple[str, str]] = []
  while True:
    try:
      message = input("> ").strip()
    except EOFError:
      break
    if not message:
      break
    if message == "/reset":
      history = []
      continue
    stream = _Stream(sp)
    [done] = gen.generate(
      [chat_prompt_ids(sp, history, message, fmt)], on_tokens=stream, chunk=1, **common
    )
    print()
    history.append((message, done.text.strip()))


def console_main() -> None:
  sys.exit(main())
