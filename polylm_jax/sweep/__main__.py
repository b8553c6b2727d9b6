from polylm_jax.sweep.sweep_cli import console_main

console_main()
