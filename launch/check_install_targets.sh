#!/usr/bin/env bash
# Resolves every platform's install target against the package index without installing
# anything (pip --dry-run; only package metadata is fetched), so a dependency change that breaks
# the TPU or GPU install fails here instead of on a pod. Prints what each target would install.
#   bash launch/check_install_targets.sh            (uses the python on PATH, e.g. .venv's)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
report="$(mktemp -d)"
trap 'rm -rf "$report"' EXIT
status=0
for target in "requirements.txt" "requirements-tpu.txt" "requirements-cuda12.txt" ".[cuda13]"; do
  if [[ "$target" == .* ]]; then args=("$ROOT${target#.}"); name="pip install '$target'"; else
    args=(-r "$ROOT/$target"); name="$target"; fi
  out="$report/$(echo "$target" | tr -c 'a-z0-9\n' '_').json"
  if "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$out" "${args[@]}" \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); then
    "$PYTHON" - "$out" "$name" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
pins = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
key = [f"{k} {pins[k]}" for k in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin",
                                  "jax-cuda13-plugin", "tensorflow", "seqio") if k in pins]
print(f"ok   {sys.argv[2]}: {len(pins)} packages ({', '.join(key)})")
PY
  else
    echo "FAIL $name does not resolve (pip output above)"
    status=1
  fi
done
exit $status
