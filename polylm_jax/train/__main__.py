from polylm_jax.train.cli import console_main

console_main()
