"""The training commands: `polylm-train` (cli.py, run.py), `polylm-compile` (compile_cli.py) and
`polylm-cache` (cache_cli.py), and the gin wiring they share (gin_setup.py). They assemble the
engine (`polylm_jax.trainer`), the data pipeline, checkpoints and evaluation; nothing below
imports them."""
