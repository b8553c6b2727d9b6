from polylm_jax.self_instruct.cli import console_main

console_main()
