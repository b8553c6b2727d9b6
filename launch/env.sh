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
cd "$ROOT"
