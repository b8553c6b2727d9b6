"""lm-eval log-likelihood throughput: the `polylm_jax` model vs lm-eval's `hf` model on the export.

Both score the same distinct requests (sentences of the embedded sample corpus in all 18 languages
as contexts and continuations), with the same batch size, after a warm-up pass over all of them;
requests/s of each (the best of `--repeats` passes) and the ratio, and the largest difference
between their log-likelihoods.
Random weights of the chosen preset (exported to the GPT-2 layout) and the embedded tokenizer.

  python bench/lm_eval_bench.py                                  # `small`, float32, CPU
  python bench/lm_eval_bench.py --preset polylm_1.7b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


class _Request:
  def __init__(self, args):
    self.args = args


def requests(n: int) -> list[_Request]:
  """n distinct (context, continuation) pairs from the embedded sample corpus (all languages);
  distinct, because lm-eval's hf model scores identical requests once."""
  from polylm_jax.data import sample

  lines = [line for lang in sample.LANGUAGES for line in sample.sample_lines(lang)]
  out = []
  for i in range(n):
    context = lines[i % len(lines)] + " " + lines[(7 * i + 3) % len(lines)]
    out.append(_Request((context, " " + lines[(13 * i + 5) % len(lines)][:30])))
  assert len({r.args for r in out}) == n
  return out


def timed(lm, reqs, repeats: int) -> float:
  """Requests/s of the best of `repeats` passes (a loaded machine only ever adds time)."""
  from decode_bench import best_of

  lm.loglikelihood(reqs, disable_tqdm=True)  # warm-up: compiles every shape once
  took, _ = best_of(lambda: lm.loglikelihood(reqs, disable_tqdm=True), repeats)
  return len(reqs) / took


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--requests", type=int, default=480)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--device", default="cpu")
  parser.add_argument(
    "--repeats", type=int, default=3, help="timed passes per side; the best counts"
  )
  args = parser.parse_args()
  import jax
  import numpy as np
  from decode_bench import cpu_name
  from lm_eval.models.huggingface import HFLM

  from polylm_jax.config import PRESETS
  from polylm_jax.data import sample
  from polylm_jax.eval.lm_eval_model import PolyLMJax
  from polylm_jax.export import hf_export, tokenizer_files
  from polylm_jax.model import params as P

  cfg = PRESETS[args.preset].replace(dtype=args.dtype, attention_impl="auto")
  params = jax.device_get(P.init_params(cfg, 0))
  reqs = requests(args.requests)
  print(
    f"lm-eval loglikelihood benchmark: {cfg.name} ({args.dtype}), {len(reqs)} requests, batch "
    f"{args.batch_size}; jax {jax.__version__} on {jax.devices()[0].device_kind}; "
    f"CPU {cpu_name()} ({os.cpu_count()} cores)"
  )
  with tempfile.TemporaryDirectory() as tmp:
    out = hf_export.export_params(params, cfg, f"{tmp}/hf", dtype=args.dtype)
    tokenizer_files.write_tokenizer(out, sample.TOKENIZER_MODEL.read_bytes(), cfg.max_length)
    ours = PolyLMJax(hf_dir=str(out), batch_size=args.batch_size, dtype=args.dtype)
    ours.show_progress = False
    mine = timed(ours, reqs, args.repeats)
    theirs_lm = HFLM(
      pretrained=str(out), dtype=args.dtype, batch_size=args.batch_size, device=args.device
    )
    theirs = timed(theirs_lm, reqs, args.repeats)
    a = [x for x, _ in ours.loglikelihood(reqs[:32], disable_tqdm=True)]
    b = [x for x, _ in theirs_lm.loglikelihood(reqs[:32], disable_tqdm=True)]
    diff = np.max(np.abs(np.subtract(a, b)))
    print(
      f"polylm_jax {mine:8.1f} requests/s | hf {theirs:8.1f} requests/s | ratio "
      f"{mine / theirs:.2f}x | max |loglik diff| on 32 requests {diff:.2e}"
    )


if __name__ == "__main__":
  main()
