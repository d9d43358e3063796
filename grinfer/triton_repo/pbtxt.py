"""Triton `config.pbtxt` text from plain descriptions: tensors, parameters, ensemble steps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    """One model input or output: Triton data type (INT64, FP32, BYTES, ...) and dims (-1 = any length)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # allow_ragged_batch: batched requests keep their own lengths

    def render(self) -> str:
        extra = " optional: true" if self.optional else ""
        extra += " allow_ragged_batch: true" if self.ragged else ""
        dims = ", ".join(str(d) for d in self.dims)
        dtype = "STRING" if self.dtype == "BYTES" else self.dtype  # config files call BYTES tensors TYPE_STRING
        return f'  {{ name: "{self.name}" data_type: TYPE_{dtype} dims: [ {dims} ]{extra} }}'


def _quote(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config(name: str, inputs: list[Tensor], outputs: list[Tensor], *, backend: str | None = None,
                 platform: str | None = None, max_batch_size: int = 0, parameters: dict[str, str] | None = None,
                 instances: int | None = None, gpu: int | None = None, batching_delay_us: int | None = None,
                 ensemble_steps: list[tuple[str, dict[str, str], dict[str, str]]] | None = None) -> str:
    """The text of one model's config.pbtxt; ensemble steps are (model, {its input: tensor}, {its output: tensor});
    `gpu` puts the instances on that GPU, else they run on the CPU."""
    lines = [f"name: {_quote(name)}"]
    lines.append(f"backend: {_quote(backend)}" if backend else f"platform: {_quote(platform or 'ensemble')}")
    lines.append(f"max_batch_size: {max_batch_size}")
    lines.append("input [\n" + ",\n".join(t.render() for t in inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(t.render() for t in outputs) + "\n]")
    if instances is not None and gpu is not None:  # pinned to one GPU (not one instance on every GPU)
        lines.append(f"instance_group [ {{ kind: KIND_GPU count: {instances} gpus: [ {gpu} ] }} ]")
    elif instances is not None:
        lines.append(f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]")
    if batching_delay_us is not None:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {batching_delay_us} }}")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    if ensemble_steps:
        steps = []
        for model, inputs_map, outputs_map in ensemble_steps:
            maps = [f"      input_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in inputs_map.items()]
            maps += [f"      output_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in outputs_map.items()]
            steps.append(f"    {{\n      model_name: {_quote(model)}\n      model_version: -1\n" + "\n".join(maps)
                         + "\n    }")
        lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}")
    return "\n".join(lines) + "\n"
