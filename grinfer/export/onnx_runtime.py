"""ONNX Runtime sessions for exported graphs, on the best execution provider the installed runtime offers.

Providers are taken in the order TensorRT, CUDA, CPU from `onnxruntime.get_available_providers()`;
`OnnxModel.provider` says which one the session runs on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from grinfer.export.runtime import ExportedModel

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available: list[str] | None = None) -> list[str]:
    """The providers to ask for, best first: those of PROVIDER_ORDER that are available."""
    available = ort.get_available_providers() if available is None else available
    return [p for p in PROVIDER_ORDER if p in available]


class OnnxModel(ExportedModel):
    """An exported .onnx graph in an ONNX Runtime session."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers or choose_providers())
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._outputs = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        """The execution provider the session runs on (the first one it accepted)."""
        return self.session.get_providers()[0]

    def run(self, inputs: dict) -> dict[str, torch.Tensor]:
        feed = {name: np.ascontiguousarray(inputs[name].cpu().numpy() if isinstance(inputs[name], torch.Tensor)
                                           else inputs[name]) for name in self.input_names}
        return dict(zip(self._outputs, (torch.from_numpy(o) for o in self.session.run(self._outputs, feed))))
