#!/usr/bin/env bash
# One command on a GPU for the loss figures (docs/benchmarks.md): the polylm_1.7b train step
# (bench/gpu_check.py section 3, pallas_gpu attention, remat dots_no_batch) with the whole-logits
# loss and with the vocabulary-tiled loss, at growing batch sizes: tokens/s, MFU, and where it
# runs out of memory. Each configuration runs in its own process, so one out-of-memory does not
# affect the next. Output is saved to $OUT/gpu_loss.log when $OUT is set, else /tmp/gpu_loss.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  for spec in ${SPECS:-"full:4" "tiled:4" "full:8" "tiled:8" "tiled:16"}; do
    # loss:batch[:token_tile:vocab_tile]
    IFS=: read -r loss batch tt vt <<< "$spec"
    echo "== loss $loss, batch $batch ${tt:+tiles $tt x $vt}"
    timeout "${EACH_S:-150}" python3 bench/gpu_check.py --sections 3 --impl pallas_gpu \
      --train_reps 5 --loss "$loss" --batch "$batch" --loss_token_tile "${tt:-1024}" \
      --loss_vocab_tile "${vt:-4096}" 2>&1 | grep -v "^Traceback\|^  File\|^    " |
      tail -4
  done
} 2>&1 | tee "${OUT:-/tmp}/gpu_loss.log"
