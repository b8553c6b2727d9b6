"""Generation: KV-cache decoding (generate.py), sampling (sampling.py), loading a model from a
workdir, a checkpoint or an export (loading.py), and `polylm-generate` (generate_cli.py)."""

# Layouts of the weights and KV cache while decoding (generate.py); here so that the command-line
# parsers can offer them without importing jax.
LAYOUTS = ("auto", "scan", "unrolled")
