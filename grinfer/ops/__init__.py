"""Ops, one module per job: a dispatcher per op checks its arguments and picks the kernel.

    groups.py          token groups [U | S | R | C], the mask over them, time buckets, relative positions
    jagged.py          values + offsets helpers
    hstu_attention.py  the attention dispatcher (kernel="auto|reference|triton"): jagged, paged and planned entries
    layer_norm.py      the layer-epilogue dispatchers (GroupLN, SiLU + K/V scatter, GroupLN * U)
    reference/         each op defined once in plain PyTorch
    triton/            the Triton twins (GPU; CPU only through TRITON_INTERPRET=1)
"""
