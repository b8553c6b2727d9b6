"""polylm-jax: pre-train and instruction-tune PolyLM-style multilingual LLMs in JAX/Flax NNX.

Importing the package (and `polylm_jax.model`, `polylm_jax.sharding`, `polylm_jax.trainer.step`)
needs only jax, flax and optax (a GPU or TPU host needs no seqio, tensorflow or gin to train from
its own batches or to generate). Those are imported only by the data pipeline (`polylm_jax.data`)
and the gin-driven commands (`polylm_jax.train`). docs/architecture.md shows the layers.
"""

__version__ = "0.1.0"
