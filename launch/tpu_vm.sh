#!/usr/bin/env bash
# Installs polylm-jax on every worker of a Cloud TPU VM slice and starts the training run there.
#
#   bash launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=P] --workdir=DIR \
#       --gin_file=runs/pretrain.gin --gin_file=models/polylm_13b.gin [--gin_bindings=...] \
#       [--setup_only] [--any other polylm-train flag]
#
# 1. copies this checkout (git archive of HEAD: commit first) to ~/polylm-jax on every worker;
# 2. on every worker (--worker=all): creates ~/polylm-jax/.venv and installs
#    requirements-tpu.txt (jax[tpu] with libtpu) and the package, in parallel;
# 3. on every worker: starts `polylm-train --distributed` with the given gin files and workdir in
#    the background (nohup), its console going to ~/polylm-train.log on each worker.
# JAX finds the coordinator and the process count by itself on TPU VMs. The workdir must be the
# same for all workers: a shared mount (Filestore/NFS) or a bucket path Orbax can write.
# Follow the run:  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 \
#                    --command='tail -f ~/polylm-train.log'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD="${GCLOUD:-gcloud}"
tpu="" zone="" project="" workdir="" setup_only=0
train_args=()
for arg in "$@"; do
  case "$arg" in
    --tpu=*) tpu="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --setup_only) setup_only=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) train_args+=("$arg") ;;
  esac
done
[[ -n "$tpu" ]] || { echo "tpu_vm.sh: --tpu=NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "tpu_vm.sh: --zone=ZONE is required" >&2; exit 2; }
if (( ! setup_only )); then
  [[ -n "$workdir" ]] || { echo "tpu_vm.sh: --workdir=DIR is required" >&2; exit 2; }
  printf '%s\n' "${train_args[@]}" | grep -q '^--gin_file=' ||
    { echo "tpu_vm.sh: at least one --gin_file=... is required" >&2; exit 2; }
fi
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

if ! git -C "$ROOT" diff --quiet HEAD; then
  echo "tpu_vm.sh: note: uncommitted changes are not copied (the workers get HEAD)" >&2
fi
archive="$(mktemp -d)/polylm-jax.tar.gz"
git -C "$ROOT" archive --format=tar.gz -o "$archive" HEAD
"$GCLOUD" compute tpus tpu-vm scp "$archive" "$tpu:polylm-jax.tar.gz" "${where[@]}" --worker=all
"$GCLOUD" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="set -e
  rm -rf ~/polylm-jax.new && mkdir ~/polylm-jax.new && tar -xzf ~/polylm-jax.tar.gz -C ~/polylm-jax.new
  bash ~/polylm-jax.new/launch/tpu_worker_setup.sh"
(( setup_only )) && exit 0

quoted="$(printf ' %q' "--workdir=$workdir" "${train_args[@]}")"
"$GCLOUD" compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all --command="
  cd ~/polylm-jax && source .venv/bin/activate &&
  nohup python -m polylm_jax.train --distributed$quoted > ~/polylm-train.log 2>&1 < /dev/null &
  echo started on \$(hostname)"
echo "polylm-train started on every worker of $tpu; console: ~/polylm-train.log on each worker"
