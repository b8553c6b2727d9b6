from polylm_jax.eval.eval_cli import console_main

console_main()
