from polylm_jax.self_instruct.self_instruct_cli import console_main

console_main()
