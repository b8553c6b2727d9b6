from polylm_jax.decode.generate_cli import console_main

console_main()
