"""Data: the embedded sample corpus, the SentencePiece tokenizer, seqio tasks and packed batches.

`polylm_jax.data.sample` and `polylm_jax.data.tokenizer` need only sentencepiece; `tasks` and
`pipeline` need seqio and tensorflow. Importing the package imports neither: TensorFlow loaded
before another native library (triton, with a CUDA torch) can crash the process, so only the
modules that run the pipeline load it. Commands that do call `console.import_tensorflow()` first,
which filters TensorFlow's import-time notices.
"""
