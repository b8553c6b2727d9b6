"""Generation: KV-cache decoding (generate.py), sampling (sampling.py), loading a model from a
workdir, a checkpoint or an export (loading.py), and `polylm-generate` (cli.py)."""
