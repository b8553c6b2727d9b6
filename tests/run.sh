#!/usr/bin/env bash
# Install everything into .venv, check the code (ruff lint + format, mypy), then run the tests
# (what CI runs). Extra arguments go to pytest, e.g. `-m "not slow"` for the fast tier, `-n 0`
# for one test process.
source "$(dirname "$0")/../launch/env.sh" requirements-test.txt requirements-beam-nodeps.txt
ruff check polylm_jax tests bench
ruff format --check polylm_jax tests bench
mypy
# One test process per logical CPU, at most 4 (pytest-xdist; a module's tests stay in one
# process, so the runs a module shares are trained once; modules in conftest.py's order, longest
# first): most of a test is single-threaded start-up work.
python -m pytest -q -n logical --maxprocesses=4 --dist loadfile --no-loadscope-reorder "$@"
