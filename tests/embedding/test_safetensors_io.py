"""Streamed safetensors writes and memory-mapped reads agree with the safetensors library both ways."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from grinfer.embedding.safetensors_io import StreamingWriter, mmap_tensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(13, 5, generator=g), "b.data": torch.randint(0, 255, (7, 3), generator=g,
                                                                               dtype=torch.uint8),
            "b.scale": torch.randn(7, generator=g).half(), "c": torch.randn(4, 2, generator=g).bfloat16(),
            "empty": torch.zeros(0, 4)}


def test_rows_written_in_any_order_and_chunking_read_back_with_safetensors(tmp_path):
    want = tensors()
    with StreamingWriter(tmp_path / "s.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in want.items()}) as w:
        w.write("a.weight", 9, want["a.weight"][9:])  # the tail first
        w.write("a.weight", 0, want["a.weight"][:9])
        for name in ("b.data", "b.scale", "c"):
            for first in range(0, len(want[name]), 3):
                w.write(name, first, want[name][first:first + 3])
    got = load_file(str(tmp_path / "s.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_mmap_reads_what_safetensors_wrote_and_writes_stay_private(tmp_path):
    want = tensors()
    save_file(want, str(tmp_path / "s.safetensors"))
    got = mmap_tensors(tmp_path / "s.safetensors")
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    got["a.weight"][0] = 0.0  # copy-on-write: the file keeps its values
    assert torch.equal(load_file(str(tmp_path / "s.safetensors"))["a.weight"], want["a.weight"])


def test_a_chunk_that_does_not_fit_names_the_tensor(tmp_path):
    with StreamingWriter(tmp_path / "s.safetensors", {"x": (torch.float32, (4, 2))}) as w, \
            pytest.raises(ValueError, match=r"x: rows 3\+2"):
        w.write("x", 3, torch.zeros(2, 2))


def test_file_rows_read_the_rows_asked_for_in_runs_and_alone(tmp_path):
    from grinfer.embedding.safetensors_io import FileRows

    want = tensors()
    save_file(want, str(tmp_path / "s.safetensors"))
    for name in ("a.weight", "b.data", "b.scale", "c"):
        rows = FileRows(tmp_path / "s.safetensors", name)
        n = len(want[name])
        for index in ([0], [1, 2, n - 2, n - 1], list(range(n)), []):
            got = rows.take(torch.tensor(index, dtype=torch.int64))
            assert got.dtype == want[name].dtype and torch.equal(got, want[name][index]), (name, index)
    with pytest.raises(IndexError, match="rows: outside the tensor's 13 rows"):
        FileRows(tmp_path / "s.safetensors", "a.weight").take(torch.tensor([13]))
