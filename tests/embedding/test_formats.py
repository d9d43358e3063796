"""Row formats: every format's round trip stays within its error bound; sizes; bad input names the field."""

from __future__ import annotations

import pytest
import torch

from grinfer.embedding.formats import (
    ROW_FORMATS,
    bytes_per_row,
    check_format,
    decode_rows,
    encode_rows,
    max_abs_error,
    part_names,
    row_dim,
)


@pytest.mark.parametrize("fmt", ROW_FORMATS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_round_trip_within_the_formats_bound(fmt, scale):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(257, 24, generator=g) * scale + torch.randn(257, 1, generator=g) * scale
    parts = encode_rows(rows, fmt)
    assert set(parts) == set(part_names(fmt))
    assert row_dim(parts, fmt) == 24
    back = decode_rows(parts, fmt)
    assert back.dtype == torch.float32 and back.shape == rows.shape
    err = (back - rows).abs().amax(-1)
    assert bool((err <= max_abs_error(rows, fmt)).all()), float((err - max_abs_error(rows, fmt)).max())
    if fmt == "fp32":
        assert torch.equal(back, rows)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_rows_use_the_full_code_range_and_keep_each_rows_extremes(fmt):
    rows = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    back = decode_rows(encode_rows(rows, fmt), fmt)
    step = (rows.amax(-1) - rows.amin(-1)) / (255 if fmt == "int8" else 15)
    assert bool(((back.amin(-1) - rows.amin(-1)).abs() <= step * 0.01 + 1e-3).all())
    assert bool(((back.amax(-1) - rows.amax(-1)).abs() <= step * 0.51).all())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_constant_row_decodes_to_its_constant(fmt):
    rows = torch.full((3, 8), 0.25)
    assert torch.allclose(decode_rows(encode_rows(rows, fmt), fmt), rows)


def test_int4_packs_two_codes_per_byte_and_bytes_per_row_matches_the_parts():
    rows = torch.randn(10, 64)
    for fmt in ROW_FORMATS:
        parts = encode_rows(rows, fmt)
        assert sum(t.nbytes for t in parts.values()) == 10 * bytes_per_row(fmt, 64), fmt
    assert bytes_per_row("int8", 64) == 72 and bytes_per_row("int4", 64) == 36 and bytes_per_row("fp32", 64) == 256


def test_bad_formats_name_the_field():
    with pytest.raises(ValueError, match="format: unknown row format 'int3'"):
        check_format("int3", 8)
    with pytest.raises(ValueError, match=r"format: int4 .* even row width, got 7"):
        encode_rows(torch.zeros(2, 7), "int4")
