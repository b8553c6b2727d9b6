from polylm_jax.eval.cli import console_main

console_main()
