"""Data: the embedded sample corpus, the SentencePiece tokenizer, seqio tasks and packed batches.

`polylm_jax.data.sample` and `polylm_jax.data.tokenizer` need only sentencepiece; `tasks` and
`pipeline` need seqio and tensorflow (not installed on the GPU check machine).
"""
