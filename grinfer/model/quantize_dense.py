"""Dense low precision for the HSTU layers' linear projections (uvqk and out), through torchao.

    none           the model's own dtype
    int8           int8 weight-only (per output channel scales), CPU and CUDA
    int8-dynamic   int8 weights and per-token dynamically quantised int8 activations, CPU and CUDA
    fp8            fp8 e4m3 row-wise weights and activations (dynamic), CUDA compute capability >= 8.9 only
                   (H100/H200); chosen by the device's capability, refused anywhere else

Only the layer stack is quantised: embeddings, input MLPs and heads keep the model's dtype (embedding
tables have their own row formats in grinfer.embedding). The projections stay `nn.Linear` modules whose
weight is a torchao tensor subclass, so `F.linear` (eager, compiled, the uncached baseline) dispatches to
torchao's kernels; `linear` below is the one call the fused backend uses for both kinds of weight.
"""

from __future__ import annotations

import logging
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

DENSE_MODES = ("none", "int8", "int8-dynamic", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: fp8 tensor cores (torch._scaled_mm)
M = TypeVar("M", bound=nn.Module)


def _torchao():
    """Import torchao. At import it logs warnings about its CUDA extensions that do not match this torch build
    (not used by the configs here) and torch logs one about an enum it registers with pytree: those two
    loggers are quietened for the import only."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as exc:
        raise ValueError("dense: low-precision layers need torchao (pip install 'grinfer[quant]')") from exc
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return quantization


def check_dense(mode: str, device: torch.device | str) -> None:
    """Raise ValueError naming `dense` unless `mode` can run on `device`."""
    if mode not in DENSE_MODES:
        raise ValueError(f"dense: expected one of {', '.join(DENSE_MODES)}, got {mode!r}")
    dev = torch.device(device)
    if mode == "fp8":
        if dev.type != "cuda":
            raise ValueError("dense: fp8 runs on CUDA devices of compute capability >= 8.9 (H100/H200); "
                             "use int8 or int8-dynamic on the CPU")
        capability = torch.cuda.get_device_capability(dev)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"dense: fp8 needs compute capability >= 8.9, {torch.cuda.get_device_name(dev)} "
                             f"has {capability[0]}.{capability[1]}; use int8")
    if mode != "none":
        _torchao()


def dense_config(mode: str):
    """The torchao quantisation config of a mode other than 'none'."""
    q = _torchao()
    if mode == "int8":
        return q.Int8WeightOnlyConfig()
    if mode == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig()
    if mode == "fp8":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow())
    raise ValueError(f"dense: expected one of {', '.join(DENSE_MODES[1:])}, got {mode!r}")


def quantize_dense(model: M, mode: str) -> M:
    """Quantise, in place, every linear projection of `model.layers` (MTGR's or HSTU's layer stack) to `mode`;
    call it after the model is on its device and in its dtype. Projections already quantised are left as they
    are (several engines may be built over one model). Returns the model."""
    if mode == "none":
        return model
    check_dense(mode, next(model.parameters()).device)
    layers = cast(nn.Module, model.layers)
    _torchao().quantize_(layers, dense_config(mode),
                         filter_fn=lambda m, _: isinstance(m, nn.Linear) and not is_quantized(m))
    return model


def is_quantized(layer: nn.Linear) -> bool:
    """Whether the projection's weight is a torchao low-precision tensor (a subclass of Tensor)."""
    return type(layer.weight.data) is not torch.Tensor


def linear(x: torch.Tensor, layer: nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b; with `residual`, residual + x W^T without the bias (the fused stack adds it in the next
    norm). One cuBLAS addmm for a plain weight, torchao's kernel through F.linear for a quantised one (its
    tensors implement linear, not the transposed weight addmm takes)."""
    if residual is None:
        return F.linear(x, layer.weight, layer.bias)
    if is_quantized(layer):
        return residual + F.linear(x, layer.weight)
    return torch.addmm(residual, x, layer.weight.t())
