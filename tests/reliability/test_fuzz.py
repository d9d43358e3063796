"""Fuzzing a live server: schemathesis cases generated from /openapi.json sent to the real REST app
over a real SQLite store, with its response checks (no 5xx, documented statuses, content types,
bodies and headers, invalid data rejected); and every gRPC method fed typed bad messages and raw
garbage bytes (never INTERNAL or UNKNOWN)."""

from __future__ import annotations

import os
import random

import grpc
import pytest
import schemathesis
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from live_stack import API_KEY, LiveStack
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from grinfer.serving.grpc_server import SERVICE_NAME
from grinfer.serving.proto import grinfer_pb2 as pb

# per operation and mode (positive, negative): at most 9 x 2 x 80 = 1,440 cases in CI; a longer run:
# GRINFER_FUZZ_CASES=600 pytest tests/reliability/test_fuzz.py -s (about 10,000 cases)
REST_CASES_PER_OPERATION = int(os.environ.get("GRINFER_FUZZ_CASES", "80"))
GRPC_CASES_PER_METHOD = 120  # typed bad messages, and as many raw byte strings
GRPC_BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
METHODS = list(pb.DESCRIPTOR.services_by_name["Recommender"].methods)
STRINGS = ["", "0", "u1", "x" * 129, "bad id", "../../etc/passwd", "a\u0000b", "\u00fc\u4e2d", "' OR 1=1 --",
           "a\r\nSet-Cookie: x", "9" * 40, "\U0001f600" * 50]
INT32 = [-(2**31), -1, 0, 1, 4, 5, 6, 500, 501, 2000, 2001, 600_000, 600_001, 2**31 - 1]
INT64 = [-(2**63), -1, 0, 1, 7, 10**9, 4_102_444_800, 4_102_444_801, 2**31, 2**63 - 1]


def no_server_error_but_the_asked_deadline(ctx, response, case):
    """not_a_server_error, except the 504 a request earns with its own deadline_ms (e.g. 1 ms: documented)."""
    if response.status_code == 504 and response.json().get("field") == "deadline_ms":
        return True
    return not_a_server_error(ctx, response, case)


def rejected_invalid_data_413_included(ctx, response, case):
    """negative_data_rejection, counting 413 (a generated body over the size limit) as a rejection too."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


CHECKS = [no_server_error_but_the_asked_deadline, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, rejected_invalid_data_413_included]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = LiveStack(tmp_path_factory.mktemp("fuzz") / "store.db")
    yield stack
    stack.close()


def _fuzz_operation(operation, mode: GenerationMode, headers: dict | None = None,
                    statuses: set[int] | None = None) -> int:
    """Send one operation's generated cases with every check (and with `headers`); how many were sent.

    Each response's status is added to `statuses` when it is given."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=REST_CASES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def send(case):
        nonlocal sent
        sent += 1
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        if statuses is not None:
            statuses.add(response.status_code)

    try:
        send()
    except Unsatisfiable:  # an operation with no inputs (e.g. /healthz) has no negative cases
        assert mode is GenerationMode.NEGATIVE, operation.label
    return sent


def test_generated_rest_requests_pass_every_check(live):
    openapi = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    cases = {}
    for result in openapi.get_all_operations():
        operation = result.ok()
        cases[operation.label] = sum(_fuzz_operation(operation, mode, {"X-API-Key": API_KEY})
                                     for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))
    print(f"schemathesis: {sum(cases.values())} cases over {len(cases)} operations")
    assert len(cases) >= 9 and sum(cases.values()) >= 6 * REST_CASES_PER_OPERATION, cases


def _hostile_value(field: FieldDescriptor, rng: random.Random, depth: int):
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _hostile_message(GetMessageClass(field.message_type), rng, depth + 1)
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if field.type == FieldDescriptor.TYPE_INT32:
        return rng.choice(INT32)
    return rng.choice(INT64)


def _hostile_message(message_type, rng: random.Random, depth: int = 0):
    """A message of `message_type` whose fields hold edge values: empty, huge, negative, malformed, many."""
    message = message_type()
    for field in message_type.DESCRIPTOR.fields:
        if rng.random() < 0.2:
            continue  # unset: the schema's default (or a missing required value)
        if field.is_repeated:
            count = rng.choice([0, 1, 2, 3, 2001]) if depth == 0 else rng.choice([0, 1])
            getattr(message, field.name).extend(_hostile_value(field, rng, depth) for _ in range(count))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(_hostile_value(field, rng, depth))
        else:
            setattr(message, field.name, _hostile_value(field, rng, depth))
    return message


def _garbage(rng: random.Random) -> bytes:
    """Raw bytes: random, a truncated varint, invalid UTF-8 in field 1, a length past the end, or nothing."""
    return rng.choice([rng.randbytes(rng.randint(1, 64)), b"\x08", b"\x0a\x02\xff\xfe", b"\x0a\x7f\x00",
                       b"\x12\x05\x08", b"\xff" * 11, b""])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_grpc_method_answers_hostile_input_without_internal_errors(live, method):
    rng = random.Random(method.name)
    typed = live.channel.unary_unary(f"/{SERVICE_NAME}/{method.name}",
                                     request_serializer=lambda m: m.SerializeToString())
    raw = live.channel.unary_unary(f"/{SERVICE_NAME}/{method.name}")
    request_type = GetMessageClass(method.input_type)
    codes = []
    for i in range(GRPC_CASES_PER_METHOD):
        metadata = (("x-api-key", API_KEY),) if i % 4 else ()
        for call, request in ((typed, _hostile_message(request_type, rng)), (raw, _garbage(rng))):
            try:
                call(request, metadata=metadata, timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                assert error.code() not in GRPC_BROKEN, (method.name, request, error.details())
                codes.append(error.code())
    assert grpc.StatusCode.INVALID_ARGUMENT in codes and len(codes) == 2 * GRPC_CASES_PER_METHOD


def test_generated_keyless_writes_are_all_401(live):
    openapi = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    keyed = [op for op in (result.ok() for result in openapi.get_all_operations()) if op.definition.raw.get("security")]
    assert {op.path for op in keyed} == {"/v1/events", "/v1/admin/roll-history"}
    for operation in keyed:
        statuses: set[int] = set()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, statuses=statuses)
        assert statuses == {401}, (operation.label, statuses)
