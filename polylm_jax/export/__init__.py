"""Export to / import from the Hugging Face GPT-2 layout of the released PolyLM checkpoints.

Needs numpy and ml_dtypes only (no torch): safetensors files are written by `safetensors_io`.
"""
