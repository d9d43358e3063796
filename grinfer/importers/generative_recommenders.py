"""Meta generative-recommenders' research HSTU (its `HSTU` sequential encoder) <-> grinfer's HSTURetrieval.

Their state dict (as `torch.save({"model_state_dict": ...})` writes it, DDP's `module.` prefix allowed):

    _embedding_module._item_emb.weight                    [num_items + 1, D]
    _input_features_preproc._pos_emb.weight               [N, D]   N = max_sequence_length + gr_output_length + 1
    _hstu._attention_layers.{i}._uvqk                     [D, 2 * H * (dv + dqk)]   x @ W, no bias
    _hstu._attention_layers.{i}._o.weight / ._o.bias      [D, H * dv] / [D]
    _hstu._attention_layers.{i}._rel_attn_bias._pos_w     [2N - 1]   (with the relative attention bias)
    _hstu._attention_layers.{i}._rel_attn_bias._ts_w      [num_buckets + 1]
    _attn_mask                                            [N, N] buffer (the causal mask)

The heads and per-head widths are not in the tensors; they come from the training's gin file
(hstu_encoder.num_heads / dqk / dv) or from --set. Their conventions map onto grinfer's options:
alpha = 1, LayerNorms without affine (eps 1e-6), no uvqk bias, a 2N - 1 position table (reach N - 1),
the time bias from the next event's timestamp, dropout only before W_o, normaliser N.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from grinfer.config import ModelConfig, one_line_error
from grinfer.importers import CheckpointImportError

ITEM, POS, MASK = "_embedding_module._item_emb.weight", "_input_features_preproc._pos_emb.weight", "_attn_mask"
LAYER = "_hstu._attention_layers.{}."
LAYER_PARAMS = {"_uvqk": "uvqk.weight", "_o.weight": "out.weight", "_o.bias": "out.bias",
                "_rel_attn_bias._pos_w": "rel_bias.pos_table", "_rel_attn_bias._ts_w": "rel_bias.time_table"}
BIAS_PARAMS = ("_rel_attn_bias._pos_w", "_rel_attn_bias._ts_w")
_LAYER_RE = re.compile(r"^_hstu\._attention_layers\.(\d+)\.(.+)$")

# gin binding -> grinfer setting; `None` keys are checked, not mapped
GIN_SETTINGS = {"hstu_encoder.num_heads": "num_heads", "hstu_encoder.dqk": "qk_dim", "hstu_encoder.dv": "v_dim",
                "hstu_encoder.linear_dropout_rate": "dropout", "train_fn.temperature": "temperature",
                "train_fn.l2_norm_eps": "norm_eps"}
GIN_REQUIRED_VALUES = {"hstu_encoder.linear_activation": "silu", "hstu_encoder.linear_config": "uvqk",
                       "hstu_encoder.concat_ua": False, "train_fn.item_l2_norm": True,
                       "train_fn.main_module": "HSTU", "train_fn.embedding_module_type": "local"}
GIN_NORMALIZATIONS = ("rel_bias", "hstu_rel_bias")
OUTPUT_NORMS = {"l2_norm": "l2", "layer_norm": "layer_norm"}
THEIR_LN_EPS, THEIR_NORM_EPS = 1e-6, 1e-6


def read_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """Their saved tensors: a torch.save file (a {"model_state_dict": ...} training checkpoint or a bare state
    dict) or a .safetensors file; DDP's `module.` prefix removed."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointImportError(f"SRC: no file at {src}")
    try:
        if src.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(src))
        else:
            state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: one line naming it
        raise CheckpointImportError(f"SRC {src}: not a readable checkpoint ({type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    return read_state_dict_from(state, str(src))


def read_state_dict_from(saved: object, where: str = "SRC") -> dict[str, torch.Tensor]:
    """The state dict in what their training saved ({"model_state_dict": ...} or the bare dict), DDP's
    `module.` prefix removed."""
    if isinstance(saved, dict) and "model_state_dict" in saved:
        saved = saved["model_state_dict"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise CheckpointImportError(f"{where}: holds no state dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in saved.items()}


def settings_from_gin(gin: dict[str, object]) -> dict[str, object]:
    """grinfer settings from their gin bindings; a setting grinfer cannot reproduce is an error naming it."""
    for key, wanted in GIN_REQUIRED_VALUES.items():
        if key in gin and gin[key] != wanted:
            raise CheckpointImportError(f"--gin: {key} = {gin[key]!r} is not supported (grinfer computes {wanted!r})")
    if gin.get("hstu_encoder.normalization", GIN_NORMALIZATIONS[0]) not in GIN_NORMALIZATIONS:
        raise CheckpointImportError(f"--gin: hstu_encoder.normalization = {gin['hstu_encoder.normalization']!r} is "
                                    f"not supported (grinfer computes the pointwise {GIN_NORMALIZATIONS[0]!r})")
    out = {name: gin[key] for key, name in GIN_SETTINGS.items() if key in gin}
    norm = str(gin.get("train_fn.user_embedding_norm", "l2_norm"))
    if norm not in OUTPUT_NORMS:
        raise CheckpointImportError(f"--gin: train_fn.user_embedding_norm = {norm!r}; expected one of "
                                    f"{', '.join(OUTPUT_NORMS)}")
    out["output_norm"] = OUTPUT_NORMS[norm]
    return out


def _layer_count(state: dict[str, torch.Tensor]) -> int:
    """Number of attention layers; an unknown name is an error naming it."""
    layers = set()
    for name in state:
        m = _LAYER_RE.match(name)
        if m is not None and m.group(2) in LAYER_PARAMS:
            layers.add(int(m.group(1)))
        elif name not in (ITEM, POS, MASK):
            raise CheckpointImportError(f"unknown parameter {name!r} (not part of generative-recommenders' HSTU "
                                        "with a local item embedding and learned positions)")
    if not layers:
        raise CheckpointImportError(f"missing parameter {LAYER.format(0)}_uvqk: no attention layers")
    return max(layers) + 1


def _require(state: dict[str, torch.Tensor], name: str, ndim: int) -> torch.Tensor:
    if name not in state:
        raise CheckpointImportError(f"missing parameter {name!r}")
    if state[name].dim() != ndim:
        raise CheckpointImportError(f"parameter {name!r} has shape {list(state[name].shape)}; expected {ndim} dims")
    return state[name]


def model_config(state: dict[str, torch.Tensor], settings: dict[str, object], name: str) -> ModelConfig:
    """The grinfer config of their checkpoint: sizes from the tensors, heads/widths/norms from `settings`."""
    for key in ("num_heads", "qk_dim", "v_dim"):
        if key not in settings:
            gin_key = next(k for k, v in GIN_SETTINGS.items() if v == key)
            raise CheckpointImportError(f"{key}: not recorded in the checkpoint; give --gin with the training's gin "
                                        f"file ({gin_key}) or --set {key}=N")
    num_layers = _layer_count(state)
    items, pos = _require(state, ITEM, 2), _require(state, POS, 2)
    has_bias = LAYER.format(0) + BIAS_PARAMS[0] in state
    n = pos.shape[0]
    cfg = {"name": name, "kind": "hstu", "num_layers": num_layers, "d_model": items.shape[1], "max_seq_len": n,
           "mask": "causal", "group_ln": False, "normalizer": "max_len", "rel_bias": has_bias,
           "item_emb_dim": items.shape[1], "num_items": items.shape[0] - 1, "num_cross_features": 0, "tasks": (),
           "dropout": 0.2, "attn_alpha": 1.0, "ln_affine": False, "ln_eps": THEIR_LN_EPS, "uvqk_bias": False,
           "rel_pos_reach": n - 1, "time_bias_from": "next", "layer_dropout": "before_out",
           "norm_eps": THEIR_NORM_EPS, **settings}
    if has_bias:
        cfg["num_time_buckets"] = _require(state, LAYER.format(0) + BIAS_PARAMS[1], 1).shape[0]
    try:
        return ModelConfig.model_validate(cfg)
    except ValidationError as exc:
        raise CheckpointImportError(one_line_error(exc, ModelConfig, {k: f"setting {k}" for k in settings})) \
            from None


def to_grinfer_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Their tensors under grinfer's names and layouts (uvqk transposed to a Linear weight)."""
    out = {"item_emb.weight": state[ITEM], "pos_emb.weight": state[POS]}
    for i in range(cfg.num_layers):
        for theirs, ours in LAYER_PARAMS.items():
            if theirs in BIAS_PARAMS and not cfg.rel_bias:
                continue
            tensor = _require(state, LAYER.format(i) + theirs, 2 if theirs in ("_uvqk", "_o.weight") else 1)
            out[f"layers.{i}.{ours}"] = tensor.t() if theirs == "_uvqk" else tensor
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_grinfer_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_grinfer_state`, with their causal-mask buffer: a state dict their HSTU loads."""
    out = {ITEM: state["item_emb.weight"], POS: state["pos_emb.weight"],
           MASK: torch.triu(torch.ones(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool), diagonal=1)}
    for i in range(cfg.num_layers):
        for theirs, ours in LAYER_PARAMS.items():
            if theirs in BIAS_PARAMS and not cfg.rel_bias:
                continue
            tensor = state[f"layers.{i}.{ours}"]
            out[LAYER.format(i) + theirs] = tensor.t().contiguous() if theirs == "_uvqk" else tensor
    return out


def check_mask(state: dict[str, torch.Tensor], n: int) -> None:
    """Their `_attn_mask` buffer, when present, must be the causal mask of the position table's length."""
    if MASK in state:
        expected = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        if state[MASK].shape != expected.shape or not torch.equal(state[MASK].bool(), expected):
            raise CheckpointImportError(f"parameter {MASK!r} is not the causal mask of length {n} "
                                        f"(shape {list(state[MASK].shape)})")


def remap_items(table: torch.Tensor, raw_ids: np.ndarray, spec: str) -> torch.Tensor:
    """Rows of their item table (indexed by raw item id) in a grinfer catalogue's dense order (row 0 kept)."""
    if int(raw_ids.max()) >= table.shape[0]:
        raise CheckpointImportError(f"--data {spec}: item id {int(raw_ids.max())} is beyond the checkpoint's item "
                                    f"table ({table.shape[0]} rows, ids 0..{table.shape[0] - 1})")
    index = torch.as_tensor(raw_ids, dtype=torch.long).clone()
    index[0] = 0
    return table[index]
