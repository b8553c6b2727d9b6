#!/usr/bin/env bash
# Install everything into .venv and train the tiny PolyLM on the embedded 18-language sample (CPU).
# Extra arguments go to the trainer, e.g. --gin_bindings='TrainerConfig.num_steps = 100'.
source "$(dirname "$0")/env.sh" requirements.txt
WORKDIR="${WORKDIR:-workdir/quickstart}"
python -m polylm_jax.train --gin_file=gin_configs/quickstart.gin --workdir="$WORKDIR" "$@"
echo "metrics: $WORKDIR/metrics.jsonl  tensorboard: tensorboard --logdir $WORKDIR/tensorboard"
