"""Data: the embedded sample corpus, the SentencePiece tokenizer, seqio tasks and packed batches.

`polylm_jax.data.sample` and `polylm_jax.data.tokenizer` need only sentencepiece; `tasks` and
`pipeline` need seqio and tensorflow.
"""

from polylm_jax import console as _console

try:  # TensorFlow's import-time notices, filtered before any data module imports it
  _console.import_tensorflow()
except ImportError:  # sample and tokenizer work without TensorFlow
  pass
