"""`aoti`: the cached MTGR step as an AOTInductor package (`grinfer export aoti`, OUT.step.pt2), over the
engine's paged KV cache.

The package (grinfer/export/step.py) takes per-user padded tensors; a step's `StepIndex` is jagged. Per
step the backend pads the new context tokens' and the candidates' input embeddings per user, takes each
user's U + S and context key counts from `k_counts` (static_tokens, ctx_end), the cached prefix from
the query and key row counts, the context timestamps from the key metadata, and hands the engine's
block tables and K/V pool over as they are. The package returns the new context tokens' K/V, which
are written into the pool at the step's write slots, and the candidates' final hidden states, which go
through the model's heads as every backend's do.

Steps the package cannot express run on the eager layers of the same model instead (counted in
`stats()["eager_steps"]`, beside "package_steps"): layer-chunked steps (the package computes every layer
at once), steps with a size outside the package's axis ranges, and pools that store K/V in another
dtype. A failure inside the package raises, and the engine's fallback chain re-runs the step on the next
backend. The package's page size is fixed at export;
an engine with another `block_size` is refused at construction.
"""

from __future__ import annotations

import json

import torch

from grinfer.config import EngineConfig
from grinfer.engine.backends.eager import EagerBackend
from grinfer.engine.kv_pool import KVPool
from grinfer.engine.step import StepIndex
from grinfer.model.mtgr import MTGR


class AotiBackend(EagerBackend):
    name = "aoti"

    def __init__(self, model: MTGR, config: EngineConfig | None = None):
        super().__init__(model, config)
        if config is None or not config.aoti_path:
            raise ValueError("backend: 'aoti' needs aoti_path, the cached step's package (grinfer export aoti)")
        param = next(model.parameters())
        if param.device.type != "cpu" or param.dtype != torch.float32:
            raise ValueError(f"backend: 'aoti' runs its float32 CPU package on a float32 CPU model, got "
                             f"{param.dtype} on {param.device}; use 'eager', 'compiled' or 'fused' there")
        from grinfer.export.aoti_runtime import AotiModel  # the AOTInductor runtime is needed from here on only

        self.package = AotiModel(config.aoti_path)
        meta = self.package.metadata
        if self.package.part != "step":
            raise ValueError(f"aoti_path: {config.aoti_path} is the {self.package.part} graph; the aoti backend "
                             "runs the cached step (OUT.step.pt2 of grinfer export aoti)")
        if json.loads(meta["grinfer.model"]) != json.loads(model.cfg.model_dump_json()):
            raise ValueError(f"aoti_path: {config.aoti_path} was exported from another model configuration")
        block_size = int(meta["grinfer.block_size"])
        if block_size != config.block_size:
            raise ValueError(f"block_size: the aoti package at {config.aoti_path} pages the KV cache in blocks of "
                             f"{block_size} tokens, the engine in {config.block_size}; export it with "
                             f"--block-size {config.block_size}")
        self.ranges: dict[str, dict[str, int]] = json.loads(meta["grinfer.axes"])
        self.input_axes: dict[str, list[str | None]] = json.loads(meta["grinfer.inputs"])
        self.package_steps = 0
        self.eager_steps = 0  # steps the package cannot express, run on the eager layers

    def run_layers(self, x: torch.Tensor, idx: StepIndex, pool: KVPool, first: int, last: int) -> torch.Tensor:
        """Every layer through the package (new K/V written into the pool); returns hidden states whose
        candidate rows (`idx.cand_src`) hold the candidates' final states. Other steps: the eager layers."""
        inputs = None
        if (first, last) == (0, len(self.model.layers)) and pool.k.dtype == torch.float32:
            inputs, valid_new, valid_cand = step_inputs(x, idx, pool)
            if not self._fits(inputs):
                inputs = None
        if inputs is None:
            self.eager_steps += 1
            return super().run_layers(x, idx, pool, first, last)
        out = self.package.run(inputs)
        self.package_steps += 1
        pool.k[:, idx.write_slots] = out["k_new"][:, valid_new].to(pool.k.dtype)
        pool.v[:, idx.write_slots] = out["v_new"][:, valid_new].to(pool.v.dtype)
        states = x.new_zeros(x.shape)
        states[idx.cand_src] = out["cand_states"][valid_cand].to(x.dtype)
        return states

    def _fits(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether every dynamic axis of the step's inputs is within the package's range."""
        for name, names in self.input_axes.items():
            for size, axis in zip(inputs[name].shape, names):
                if axis and not self.ranges[axis]["min"] <= size <= self.ranges[axis]["max"]:
                    return False
        return True

    def stats(self) -> dict:
        return {"package_steps": self.package_steps, "eager_steps": self.eager_steps}


def step_inputs(x: torch.Tensor, idx: StepIndex, pool: KVPool) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                         torch.Tensor]:
    """The package's padded inputs (grinfer/export/step.py, STEP_INPUTS) of a full-stack step over the step's
    input embeddings x [Tq, d], and the validity masks of its padded new tokens [B, Ln] and candidates [B, Lc]
    (their true entries, row-major, are the step's write_src and cand_src rows, in order)."""
    q_off, k_off = idx.q_meta.offsets, idx.k_meta.offsets
    static, ctx_end = idx.k_counts[:, 0], idx.k_counts[:, 1]
    n_cand = k_off.diff() - ctx_end
    n_new = q_off.diff() - n_cand
    ln, lc, lk = (max(int(v), 1) for v in torch.stack([n_new.max(), n_cand.max(), ctx_end.max()]).tolist())
    x_new, valid_new = _padded(x, q_off[:-1], n_new, ln)
    x_cand, valid_cand = _padded(x, q_off[:-1] + n_new, n_cand, lc)
    ctx_ts, _ = _padded(idx.k_meta.ts, k_off[:-1], ctx_end, lk)
    request_ts = idx.k_meta.ts[(k_off[:-1] + ctx_end).clamp(max=max(len(idx.k_meta.ts) - 1, 0))]
    inputs = {"x_new": x_new, "x_cand": x_cand, "ctx_start": ctx_end - n_new, "ctx_end": ctx_end,
              "static_tokens": static, "ctx_ts": ctx_ts, "cand_len": n_cand,
              "request_ts": torch.where(n_cand > 0, request_ts, torch.zeros_like(request_ts)),
              "block_table": idx.block_table, "k_pool": pool.k, "v_pool": pool.v}
    return inputs, valid_new, valid_cand


def _padded(rows: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """rows[starts[b] + j] for j < lengths[b] as [B, width, ...] (0 elsewhere), and the [B, width] mask."""
    j = torch.arange(width, device=rows.device)
    valid = j[None] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + j[None], torch.zeros_like(valid, dtype=torch.int64))
    if len(rows) == 0:
        return rows.new_zeros((*valid.shape, *rows.shape[1:])), valid
    picked = rows[index]
    mask = valid.reshape(*valid.shape, *[1] * (rows.dim() - 1))
    return torch.where(mask, picked, torch.zeros_like(picked)), valid
