from polylm_jax.export.cli import console_main

console_main()
