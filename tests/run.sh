#!/usr/bin/env bash
# Install everything into .venv and run the test suite (what CI runs). Extra arguments go to pytest.
source "$(dirname "$0")/../launch/env.sh" requirements-test.txt requirements-beam-nodeps.txt
python -m pytest -q "$@"
