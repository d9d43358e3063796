"""What the exporters can express: a model made only of known modules, float weights and known settings.

Anything else is refused up front with an `UnsupportedFeature` naming it (a module path and type, a
parameter, a config field), instead of a trace error deep inside torch.export or an ONNX graph that
quietly computes something else.
"""

from __future__ import annotations

import torch
from torch import nn

from grinfer.config import ModelConfig
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.layers import GroupLayerNorm, HSTULayer, RelativeBias
from grinfer.model.mtgr import MTGR


class ExportError(ValueError):
    """An export that cannot be done as asked (bad path, unknown part, failed check)."""


class UnsupportedFeature(ExportError):
    """The model uses something the exporter cannot express; the message names it."""


KNOWN_MODULES = (MTGR, HSTURetrieval, HSTULayer, GroupLayerNorm, RelativeBias, nn.Embedding, nn.Linear, nn.LayerNorm,
                 nn.SiLU, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Dropout)
# every ModelConfig field the padded forwards implement (grinfer/export/forward.py, attention.py, step.py)
KNOWN_FIELDS = frozenset({
    "name", "kind", "num_layers", "d_model", "num_heads", "max_seq_len", "mask", "group_ln", "normalizer",
    "rel_bias", "num_time_buckets", "dropout", "num_items", "num_genres", "num_year_buckets", "num_actions",
    "profile_cardinalities", "num_cross_features", "item_emb_dim", "side_emb_dim", "tasks", "temperature"})
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_exportable(model: nn.Module) -> None:
    """Raise UnsupportedFeature naming the first thing in `model` the exporters cannot express."""
    if not isinstance(model, MTGR | HSTURetrieval) or type(model) not in (MTGR, HSTURetrieval):
        raise UnsupportedFeature(f"model class {type(model).__name__}: the exporters know MTGR and HSTURetrieval")
    defaults = ModelConfig()
    for field in sorted(set(ModelConfig.model_fields) - KNOWN_FIELDS):
        if getattr(model.cfg, field) != getattr(defaults, field):
            raise UnsupportedFeature(f"model setting {field}={getattr(model.cfg, field)!r}: the exporters do not "
                                     f"implement it (only its default {getattr(defaults, field)!r})")
    for name, module in model.named_modules():
        where = name or "the model"
        if type(module) not in KNOWN_MODULES:
            raise UnsupportedFeature(f"module {where} ({type(module).__module__}.{type(module).__name__}): the "
                                     f"exporters cannot express it in standard ONNX / torch.export graphs")
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise UnsupportedFeature(f"module {where}: Embedding(max_norm={module.max_norm}) renormalises its "
                                     f"table in place at every lookup; the exporters cannot express it")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype not in FLOAT_DTYPES:
            raise UnsupportedFeature(f"tensor {name} has dtype {tensor.dtype}: the exporters take float weights")
