from polylm_jax.decode.cli import console_main

console_main()
