#!/usr/bin/env bash
# Install everything into .venv, check the code (ruff lint + format, mypy), then run the tests
# (what CI runs). Extra arguments go to pytest, e.g. `-m "not slow"` for the fast tier.
source "$(dirname "$0")/../launch/env.sh" requirements-test.txt requirements-beam-nodeps.txt
ruff check polylm_jax tests bench
ruff format --check polylm_jax tests bench
mypy
python -m pytest -q "$@"
