from polylm_jax.export.export_cli import console_main

console_main()
