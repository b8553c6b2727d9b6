"""`polylm-export` / `python -m polylm_jax.export`: a training checkpoint -> a Hugging Face
directory.

  polylm-export --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16] [--max_shard_size=2GB]
                [--overwrite] [--verify]
  polylm-export --checkpoint=RUN/checkpoints/N --out=DIR ...

Weights stream from the Orbax checkpoint tensor by tensor (tensorstore partial reads) into
safetensors shards; no torch is needed unless --verify.
"""

from __future__ import annotations

import argparse
import base64
import pathlib
import re
import sys

from polylm_jax import chat, console, framing
from polylm_jax.checkpoint import on_disk
from polylm_jax.export import hf_export, tokenizer_files
from polylm_jax.io import outputs, storage


def parse_size(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
  if not m:
    raise argparse.ArgumentTypeError(f"--max_shard_size={text!r}: expected e.g. 500MB or 2GB")
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def export_checkpoint(
  step_dir,
  out_dir,
  *,
  dtype="float32",
  max_shard_bytes=2 * 2**30,
  overwrite=False,
  allow_vocab_padding=False,
  allow_nonfinite=False,
  workdir=None,
):
  """Everything is checked and written in a hidden staging directory next to `out_dir`, which
  becomes `out_dir` only when complete: a refused or failed export leaves nothing that looks like
  a model, and an earlier export at `out_dir` stays until the new one is whole. An `out_dir` on
  object storage (gs://...) is written locally first, then uploaded (outputs.publish_dir)."""
  if storage.is_remote(out_dir):
    with outputs.built_locally(
      out_dir,
      overwrite=overwrite,
      looks_like=hf_export.looks_like_export,
      kind=hf_export.EXPORT_KIND,
      last="config.json",
    ) as local:
      _, reader = export_checkpoint(
        step_dir,
        local,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        allow_vocab_padding=allow_vocab_padding,
        allow_nonfinite=allow_nonfinite,
      )
    return out_dir, reader
  reader = on_disk.CheckpointReader(step_dir)
  cfg = reader.model_config
  sp_model = reader.meta.get("tokenizer_model_b64")
  if sp_model is None:
    raise ValueError(f"{step_dir}: checkpoint metadata has no tokenizer model")
  sp_bytes = base64.b64decode(sp_model)
  _check_vocab(sp_bytes, cfg, allow_vocab_padding)
  sources = [step_dir] + ([workdir] if workdir else [])
  # An instruction-tuned checkpoint: its chat template, and PolyLM's demo sampling by default.
  instruction_format = reader.meta.get("instruction_format")
  generation = dict(chat.DEMO_GENERATION) if instruction_format else None
  with outputs.staged_directory(
    out_dir,
    overwrite=overwrite,
    kind=hf_export.EXPORT_KIND,
    looks_like=hf_export.looks_like_export,
    sources=sources,
  ) as staging:
    hf_export.write_model_files(
      reader,
      cfg,
      staging,
      dtype=dtype,
      max_shard_bytes=max_shard_bytes,
      allow_nonfinite=allow_nonfinite,
      generation=generation,
    )
    tokenizer_files.write_tokenizer(
      staging, sp_bytes, cfg.max_length, framing.from_meta(reader.meta), instruction_format
    )
    tokenizer_files.write_model_card(staging, reader.meta, dtype, str(step_dir))
  return pathlib.Path(out_dir), reader


def _check_vocab(sp_bytes: bytes, cfg, allow_vocab_padding: bool = False) -> None:
  """The tokenizer must match the embedding: a larger tokenizer can never work, a smaller one
  (a padded embedding) only when asked for with --allow_vocab_padding."""
  import sentencepiece as spm

  size = spm.SentencePieceProcessor(model_proto=sp_bytes).vocab_size()
  if size > cfg.vocab_size or (size < cfg.vocab_size and not allow_vocab_padding):
    raise ValueError(
      f"the tokenizer has {size} ids but the checkpoint's vocabulary is "
      f"{cfg.vocab_size}"
      + (
        ""
        if size > cfg.vocab_size
        else "; pass --allow_vocab_padding if the embedding was padded on purpose"
      )
    )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="polylm-export", description=console.summary(__doc__))
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (latest complete checkpoint by default)")
  src.add_argument("--checkpoint", help="a checkpoint step directory, e.g. RUN/checkpoints/1000")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", required=True)
  parser.add_argument("--dtype", default="float32", choices=sorted(hf_export.EXPORT_DTYPES))
  parser.add_argument("--max_shard_size", type=parse_size, default=2 * 2**30)
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an earlier export at --out (only an export; swapped in once "
    "the new one is complete)",
  )
  parser.add_argument(
    "--allow_nonfinite",
    action="store_true",
    help="export weights that hold NaN/Inf (refused by default)",
  )
  parser.add_argument(
    "--allow_vocab_padding",
    action="store_true",
    help="accept a model vocabulary larger than the tokenizer's",
  )
  parser.add_argument(
    "--verify",
    action="store_true",
    help="load with transformers and compare logits and tokenizer ids",
  )
  args = parser.parse_args(argv)
  if args.verify and storage.is_remote(args.out):
    parser.error(
      f"--verify loads the export with transformers from a local directory, not --out={args.out}: "
      "export to a local --out to verify it"
    )
  if args.verify:
    from polylm_jax.export import verify

    if missing := verify.missing_requirements():
      parser.error(missing)
  console.quiet_logging()  # Orbax and absl INFO lines stay out of the console
  console.choose_platform()  # no failed TPU probe on a machine without one
  try:
    step_dir = on_disk.resolve_checkpoint(args.workdir, args.step, args.checkpoint)
    out, reader = export_checkpoint(
      step_dir,
      args.out,
      dtype=args.dtype,
      max_shard_bytes=args.max_shard_size,
      overwrite=args.overwrite,
      allow_vocab_padding=args.allow_vocab_padding,
      allow_nonfinite=args.allow_nonfinite,
      workdir=args.workdir,
    )
  except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    print(f"polylm-export: {e}", file=sys.stderr)
    return 2
  print(f"exported {step_dir} -> {out} ({args.dtype})")
  if args.verify:
    from polylm_jax.export import verify

    report = verify.verify_export(out, reader)
    print(report.text())
    return 0 if report.ok else 1
  return 0


def console_main() -> None:
  sys.exit(main())
