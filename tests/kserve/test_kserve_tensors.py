"""KServe v2 tensor data: JSON lists and raw bytes decode to the same arrays and encode back; bad data is a
400 FieldError naming the tensor."""

from __future__ import annotations

import numpy as np
import pytest

from grinfer.serving.kserve.tensors import DTYPES, MAX_ELEMENTS, Tensor, from_list, from_raw, to_list, to_raw
from grinfer.serving.service import FieldError


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d not in ("BYTES", "FP16")])
def test_json_and_raw_agree_for_every_numeric_datatype(datatype):
    values = [[False, True, True], [False, True, False]] if datatype == "BOOL" else [[1, 2, 3], [4, 5, 6]]
    listed = from_list("t", datatype, [2, 3], values)
    raw = from_raw("t", datatype, [2, 3], to_raw(listed))
    assert listed.shape == raw.shape == [2, 3]
    np.testing.assert_array_equal(listed.data, raw.data)
    assert to_list(raw) == np.asarray(values, DTYPES[datatype]).reshape(-1).tolist()


def test_bytes_round_trip_with_length_prefixes():
    tensor = from_list("user_id", "BYTES", [3], ["a", "", "üser"])
    raw = to_raw(tensor)
    assert raw[:4] == (1).to_bytes(4, "little") and raw[4:5] == b"a"
    assert to_list(from_raw("user_id", "BYTES", [3], raw)) == ["a", "", "üser"]


def test_fp16_is_raw_only_but_decodes():
    data = np.array([0.5, -2.0], np.float16)
    assert from_raw("x", "FP16", [2], data.tobytes()).data.tolist() == [0.5, -2.0]


@pytest.mark.parametrize("call, message", [
    (lambda: from_list("c", "INT64", [3], [1, 2]), "2 values for shape [3]"),
    (lambda: from_list("c", "INT64", [2], [1, "x"]), "not INT64"),
    (lambda: from_list("c", "INT64", [1], [True]), "not INT64"),
    (lambda: from_list("c", "INT8", [1], [300]), "not INT8"),
    (lambda: from_list("c", "INT64", [1], [1.5]), "not INT64 values (1.5)"),
    (lambda: from_list("c", "FP32", [1], [1e39]), "not FP32"),
    (lambda: from_list("c", "BOOL", [1], [1]), "not BOOL"),
    (lambda: from_list("c", "INT64", [2**62, 2**62], []), "exceed the limit"),
    (lambda: from_list("c", "BYTES", [1], [5]), "not BYTES"),
    (lambda: from_list("c", "FLOAT", [1], [5]), "unknown datatype 'FLOAT'"),
    (lambda: from_list("c", "INT64", [-1], []), "non-negative integers"),
    (lambda: from_list("c", "INT64", [MAX_ELEMENTS + 1], []), "exceed the limit"),
    (lambda: from_raw("c", "INT64", [2], b"\0" * 12), "12 raw bytes"),
    (lambda: from_raw("c", "BYTES", [1], b"\5\0\0\0ab"), "runs past"),
    (lambda: from_raw("c", "BYTES", [2], b"\1\0\0\0a"), "1 BYTES elements"),
    (lambda: from_raw("c", "BYTES", [1], b"\1\0"), "length prefix"),
])
def test_bad_data_is_a_400_naming_the_tensor(call, message):
    with pytest.raises(FieldError) as info:
        call()
    assert info.value.status == 400 and info.value.field == "inputs.c"
    assert message in str(info.value)


def test_deeply_nested_data_flatten_row_major():
    nested: list = [5]
    for _ in range(5000):  # deeper than Python's recursion limit
        nested = [nested]
    assert from_list("c", "INT64", [1], nested).data.tolist() == [5]
    assert from_list("c", "INT64", [2, 2], [[1, 2], [3, 4]]).data.tolist() == [[1, 2], [3, 4]]


def test_tensor_shape_follows_the_data():
    assert Tensor("p", "FP32", np.zeros((4, 2), np.float32)).shape == [4, 2]
