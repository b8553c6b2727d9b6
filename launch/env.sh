# Sourced by the setup scripts: creates (once) and activates the project's virtualenv in .venv and
# installs the given requirements file plus the package itself (editable, for the console scripts),
# then the optional second file with --no-deps (see requirements-beam.txt for why one is needed).
# Usage: source launch/env.sh requirements.txt [requirements-beam-nodeps.txt]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"polylm-jax needs Python >= 3.11, found {sys.version}"'
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
# Skip pip when this very set of requirement files was installed already (a re-run of the
# quickstart starts at once); any change to them or to pyproject.toml installs again (delete
# .venv/.polylm-installed to force a reinstall).
stamp="$ROOT/.venv/.polylm-installed"
want="$(cd "$ROOT" && cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16) ${1:-requirements.txt} ${2:-}"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r "$ROOT/${1:-requirements.txt}" -e "$ROOT"
  if [ -n "${2:-}" ]; then
    python -m pip install --quiet --no-deps -r "$ROOT/$2"
  fi
  echo "$want" >> "$stamp"
fi
# Where JAX runs on the CPU, XLA allocates a step's temporaries afresh every step; glibc serves
# allocations over 32 MiB with new mappings, which the kernel then faults in 4 KiB at a time (on
# a small model as much CPU time as the step's own work, docs/benchmarks.md). With hugetlb=1
# glibc asks for transparent huge pages for those mappings (where the kernel allows them:
# `madvise` or `always` in /sys/kernel/mm/transparent_hugepage/enabled); on an accelerator host
# it only concerns large host buffers. Added to any tunables already set (a hugetlb setting of
# your own stands); glibc before 2.35 and other C libraries ignore it. It takes effect in the
# processes started from here: export it in a shell of your own to get it there.
case "${GLIBC_TUNABLES:-}" in
  *glibc.malloc.hugetlb=*) ;;
  "") export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 ;;
  *) export GLIBC_TUNABLES="$GLIBC_TUNABLES:glibc.malloc.hugetlb=1" ;;
esac
cd "$ROOT"
