"""`polylm-import`: a local Hugging Face PolyLM / GPT-2 checkpoint -> initial parameters for
training.

  polylm-import --hf_dir=polylm-1.7b --out=init/polylm-1.7b [--overwrite] [--verify]
  polylm-import --hf_dir=polylm-1.7b --out=gs://bucket/init/polylm-1.7b    # built here, uploaded

Writes `<out>/params` (an Orbax checkpoint of the parameters, in this project's layout) and
`<out>/meta.json` (model config, tokenizer, source). Start training from it with
`TrainerConfig.init_params_from = '<out>'` (continued pre-training or SFT: fresh optimizer state,
step 0). Nothing is downloaded: fetch the checkpoint yourself first.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import pathlib
import sys

import numpy as np

from polylm_jax import console
from polylm_jax.checkpoint.manager import CheckpointConfig, save_args
from polylm_jax.export import hf_export
from polylm_jax.io import disk, outputs, storage

IMPORT_KIND = "polylm-import output (meta.json + params/)"


def looks_like_import(path: str | os.PathLike) -> bool:
  """An earlier import (local or gs://...): what `--overwrite` may replace."""
  return storage.isfile(storage.join(path, "meta.json")) and storage.isdir(
    storage.join(path, "params")
  )


def import_checkpoint(hf_dir, out_dir, *, overwrite=False, scan_layers=True, allow_nonfinite=False):
  """Written in a staging directory beside `out_dir` and swapped in when complete; `out_dir` may
  not be, contain or lie inside `hf_dir`, and only an earlier import is ever replaced. An
  `out_dir` on object storage (gs://...) is written locally first, then uploaded with meta.json
  last (outputs.publish_dir)."""
  if storage.is_remote(out_dir):
    with outputs.built_locally(
      out_dir, overwrite=overwrite, looks_like=looks_like_import, kind=IMPORT_KIND, last="meta.json"
    ) as local:
      _, cfg, params = import_checkpoint(
        hf_dir, local, scan_layers=scan_layers, allow_nonfinite=allow_nonfinite
      )
    return out_dir, cfg, params
  import orbax.checkpoint as ocp

  hf_dir = pathlib.Path(hf_dir)
  disk.check_apart(out_dir, hf_dir)
  cfg = hf_export.config_from_hf(hf_dir, scan_layers=scan_layers)
  params = hf_export.import_params(
    hf_dir, cfg, scanned=scan_layers, allow_nonfinite=allow_nonfinite
  )
  with outputs.staged_directory(
    out_dir, overwrite=overwrite, kind=IMPORT_KIND, looks_like=looks_like_import, sources=[hf_dir]
  ) as staging:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
      (staging / "params").absolute(),
      params,
      save_args=save_args(params, CheckpointConfig().chunk_bytes, cfg),
    )
    checkpointer.wait_until_finished()
    meta = {"model_config": dataclasses.asdict(cfg), "source": str(hf_dir.absolute())}
    if (hf_dir / "tokenizer.model").is_file():
      meta["tokenizer_model_b64"] = base64.b64encode(
        (hf_dir / "tokenizer.model").read_bytes()
      ).decode()
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  return out_dir, cfg, params


def verify_import(hf_dir, cfg, params, *, seed: int = 0) -> tuple[bool, str]:
  """Logits of the transformers model and of the imported JAX parameters on the same ids."""
  from polylm_jax.export.verify import logits_differences

  ids = np.random.default_rng(seed).integers(3, cfg.vocab_size, (2, min(64, cfg.max_length)))
  diff = max(logits_differences(hf_dir, cfg, params, ids.tolist()))
  return diff <= 1e-4, f"logits max abs diff {diff:.2e} (tolerance 1e-4)"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="polylm-import", description=console.summary(__doc__))
  parser.add_argument("--hf_dir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an earlier import at --out (only an import; swapped in once "
    "the new one is complete)",
  )
  parser.add_argument(
    "--allow_nonfinite",
    action="store_true",
    help="import weights that hold NaN/Inf (refused by default)",
  )
  parser.add_argument("--unscanned", action="store_true", help="per-layer (unscanned) layout")
  parser.add_argument(
    "--verify",
    action="store_true",
    help="compare the imported model's logits with transformers' on the same ids",
  )
  args = parser.parse_args(argv)
  if args.verify:
    from polylm_jax.export.verify import missing_requirements

    if missing := missing_requirements():
      parser.error(missing)
  try:
    out, cfg, params = import_checkpoint(
      args.hf_dir,
      args.out,
      overwrite=args.overwrite,
      scan_layers=not args.unscanned,
      allow_nonfinite=args.allow_nonfinite,
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"polylm-import: {e}", file=sys.stderr)
    return 2
  print(f"imported {args.hf_dir} -> {out} ({cfg.num_layers} layers, d_model {cfg.d_model})")
  if args.verify:
    ok, line = verify_import(args.hf_dir, cfg, params)
    print(("PASS " if ok else "FAIL ") + line)
    return 0 if ok else 1
  return 0


def console_main() -> None:
  sys.exit(main())
