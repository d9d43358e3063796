"""AOTInductor packages (.pt2) of exported graphs: load once, run on named inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from grinfer.export.runtime import ExportedModel


class AotiModel(ExportedModel):
    """A compiled .pt2 package (torch._inductor.aoti_load_package) on the device it was compiled for."""

    def __init__(self, path: str | Path):
        self.package = torch._inductor.aoti_load_package(str(path))
        self.metadata = {k: v for k, v in self.package.get_metadata().items() if k.startswith("grinfer.")}

    def run(self, inputs: dict) -> dict[str, torch.Tensor]:
        # the compiled kernels index their inputs as dense row-major tensors (a strided view, such as a column
        # of a [B, 2] tensor, would be read wrongly)
        args = [torch.as_tensor(inputs[name]).contiguous() for name in self.input_names]
        out = self.package(*args)
        out = (out,) if isinstance(out, torch.Tensor) else out
        return dict(zip(self.output_names, out))


def write_new_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, outputs: dict[str, torch.Tensor],
                 inputs: dict[str, torch.Tensor], block_size: int) -> None:
    """Write a step's new context K/V (outputs k_new, v_new) into the pool at the users' pages, in place."""
    start, end, table = inputs["ctx_start"], inputs["ctx_end"], inputs["block_table"]
    rows = torch.arange(outputs["k_new"].shape[2], device=start.device)
    user, index = (rows[None] < (end - start)[:, None]).nonzero(as_tuple=True)
    pos = start[user] + index
    slots = table[user, pos // block_size] * block_size + pos % block_size
    k_pool[:, slots] = outputs["k_new"][:, user, index].to(k_pool.dtype)
    v_pool[:, slots] = outputs["v_new"][:, user, index].to(v_pool.dtype)
