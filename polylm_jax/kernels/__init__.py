"""Attention kernels written for this project (Pallas) and the dispatch behind `attention()`.

`flash_gpu` (Triton lowering) and `flash_tpu` (Mosaic) import jax only; importing this package
does not import either.
"""
