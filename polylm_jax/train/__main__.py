from polylm_jax.train.train_cli import console_main

console_main()
