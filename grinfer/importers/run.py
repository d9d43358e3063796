"""`grinfer import-checkpoint`: read another project's checkpoint, write a grinfer checkpoint that computes the same."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grinfer.importers import FORMATS, CheckpointImportError
from grinfer.importers import generative_recommenders as gr
from grinfer.importers.gin import read_gin

if TYPE_CHECKING:
    from grinfer.model.hstu import HSTURetrieval
    from grinfer.model.mtgr import MTGR


def convert_generative_recommenders(state: dict[str, torch.Tensor], settings: dict[str, object], name: str,
                                    raw_ids=None, data_spec: str | None = None) -> MTGR | HSTURetrieval:
    """Their state dict + settings -> a loaded HSTURetrieval; items remapped to a catalogue's order when
    `raw_ids` (dense id -> raw id) is given."""
    from grinfer.model import build_model

    state = gr.read_state_dict_from(state)
    cfg = gr.model_config(state, settings, name)
    gr.check_mask(state, cfg.max_seq_len)
    ours = gr.to_grinfer_state(state, cfg)
    if raw_ids is not None:
        ours["item_emb.weight"] = gr.remap_items(ours["item_emb.weight"], raw_ids, data_spec or "")
        cfg = cfg.replace(num_items=len(raw_ids) - 1)
    model = build_model(cfg)
    expected = model.state_dict()
    for key, tensor in ours.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointImportError(f"parameter for {key!r} has shape {list(tensor.shape)}; the settings "
                                        f"(num_heads={cfg.num_heads}, qk_dim={cfg.qk_dim}, v_dim={cfg.v_dim}, "
                                        f"d_model={cfg.d_model}) imply {list(expected[key].shape)}")
    model.load_state_dict(ours, strict=True)
    return model.eval()


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, gin: str | Path | None = None,
                      overrides: dict[str, object] | None = None, data: str | None = None) -> Path:
    """Convert `src` (format `fmt`) into a grinfer checkpoint directory `out`; returns `out`.

    `gin`: the training's gin file (their model settings); `overrides`: grinfer settings given directly;
    `data`: a dataset spec whose catalogue the item rows are put in the order of (recorded as the training data)."""
    from grinfer.model.checkpoint import save_checkpoint

    if fmt not in FORMATS:
        raise CheckpointImportError(f"--format: unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    state = gr.read_state_dict(src)
    settings = gr.settings_from_gin(read_gin(gin)) if gin else {}
    settings.update(overrides or {})
    raw_ids = None
    if data is not None:
        from grinfer.data import load_dataset

        raw_ids = load_dataset(data).catalog.raw_ids
    model = convert_generative_recommenders(state, settings, Path(src).stem, raw_ids, data)
    extra = {"imported": {"format": fmt, "source": str(Path(src).resolve()), "settings": settings}}
    if data is not None:
        extra["training"] = {"data": data}
    return save_checkpoint(model, out, extra=extra)
