#!/usr/bin/env bash
# Resolves every platform's install target against the package index without installing
# anything (pip --dry-run; only package metadata is fetched), so a dependency change that breaks
# the TPU or GPU install fails here instead of on a pod. Prints what each target would install.
#   bash launch/check_install_targets.sh            (uses the python on PATH, e.g. .venv's)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
targets=("requirements.txt" "requirements-tpu.txt" "requirements-cuda12.txt" ".[cuda13]")
for i in "${!targets[@]}"; do  # the four resolutions run at once
  target="${targets[$i]}"
  if [[ "$target" == .* ]]; then args=("$ROOT${target#.}"); else args=(-r "$ROOT/$target"); fi
  ( "$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$out/$i.json" \
      "${args[@]}" > "$out/$i.log" 2>&1; echo $? > "$out/$i.rc" ) &
done
wait
status=0
for i in "${!targets[@]}"; do
  name="${targets[$i]}"
  [[ "$name" == .* ]] && name="pip install '$name'"
  if [[ "$(cat "$out/$i.rc")" == 0 ]]; then
    "$PYTHON" - "$out/$i.json" "$name" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
pins = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
key = [f"{k} {pins[k]}" for k in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin",
                                  "jax-cuda13-plugin", "tensorflow", "seqio") if k in pins]
print(f"ok   {sys.argv[2]}: {len(pins)} packages ({', '.join(key)})")
PY
  else
    grep -v "is ignored: it is neither a file nor a directory" "$out/$i.log" >&2 || true
    echo "FAIL $name does not resolve (pip's output above)"
    status=1
  fi
done
exit $status
