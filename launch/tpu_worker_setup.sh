#!/usr/bin/env bash
# Run on each TPU VM worker by launch/tpu_vm.sh, from the freshly unpacked ~/polylm-jax.new:
# swaps it in as ~/polylm-jax (keeping an existing .venv, so a relaunch does not reinstall
# everything; the previous tree stays as ~/polylm-jax.old) and installs requirements-tpu.txt.
set -euo pipefail
new="$HOME/polylm-jax.new" dest="$HOME/polylm-jax"
[[ -d "$new" ]] || { echo "tpu_worker_setup.sh: $new is missing" >&2; exit 2; }
if [[ -d "$dest/.venv" ]]; then mv "$dest/.venv" "$new/.venv"; fi
rm -rf "$HOME/polylm-jax.old"
if [[ -d "$dest" ]]; then mv "$dest" "$HOME/polylm-jax.old"; fi
mv "$new" "$dest"
cd "$dest"
# shellcheck disable=SC1091
source launch/env.sh requirements-tpu.txt
python -c "import jax, libtpu, polylm_jax; print('polylm-jax installed on', __import__('socket').gethostname(), 'jax', jax.__version__)"
