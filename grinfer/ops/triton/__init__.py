"""Triton twins of the ops in `grinfer.ops.reference` (GPU; CPU only through TRITON_INTERPRET=1).

Importing this package does not import Triton; its modules do. Call the ops through the
dispatchers in `grinfer.ops` (e.g. `grinfer.ops.hstu_attention.hstu_attention`), which fall back to
the reference where Triton or a CUDA device is missing.
"""
