#!/usr/bin/env bash
# One command on a GPU for the generation and evaluation figures (docs/benchmarks.md): decode
# tokens/s, lm-eval log-likelihood and generate_until requests/s of polylm_1.7b vs transformers /
# lm-eval's hf model, and the 1.7B train step (bench/gpu_check.py section 3). Each part runs even if another
# fails. Output is saved to $OUT/gpu_eval.log when $OUT is set, else /tmp/gpu_eval.log.
# A machine without lm-eval can bring it as wheels in .whl/ (installed to /tmp/site first).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
PRESET="${PRESET:-polylm_1.7b}" DTYPE="${DTYPE:-bfloat16}" DEVICE="${DEVICE:-cuda}"
status=0
{
  echo "== decode ($PRESET)"; python3 bench/decode_bench.py --preset "$PRESET" --dtype "$DTYPE" \
    --device "$DEVICE" --batches 1,16 --new 64 --layouts scan,unrolled || status=1
  echo "== lm-eval loglikelihood ($PRESET)"; python3 bench/lm_eval_bench.py --preset "$PRESET" \
    --dtype "$DTYPE" --device "$DEVICE" --requests 256 || status=1
  echo "== lm-eval generate_until ($PRESET)"; python3 bench/lm_eval_bench.py --preset "$PRESET" \
    --dtype "$DTYPE" --device "$DEVICE" --kind generate_until --requests 128 --max_gen_toks 64 \
    || status=1
  if [ -z "${SKIP_TRAIN:-}" ]; then
    echo "== train step"; python3 bench/gpu_check.py --sections 3 --train_reps 5 || status=1
  fi
} 2>&1 | tee "${OUT:-/tmp}/gpu_eval.log"
exit $status
