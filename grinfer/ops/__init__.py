"""Ops: each defined once in `ops.reference` (plain PyTorch); fast kernels plug in beside it."""

from grinfer.ops.reference.hstu_attention import (
    GROUP_C,
    GROUP_R,
    GROUP_S,
    GROUP_U,
    NUM_GROUPS,
    hstu_attention,
    time_bucket,
    visible,
)

__all__ = [
    "GROUP_C",
    "GROUP_R",
    "GROUP_S",
    "GROUP_U",
    "NUM_GROUPS",
    "hstu_attention",
    "time_bucket",
    "visible",
]
