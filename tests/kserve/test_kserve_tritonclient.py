"""tritonclient (HTTP and gRPC, from the separate Triton environment: tests/tritonserver_env.py) against
grinfer itself: health, metadata, repository index, inference equal to /v1/rank (fp32 1e-5), the protocol's
errors; and grinfer's inference.proto has the field numbers of tritonclient's own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kserve_util import items_of, v1_rank
from tritonserver_env import triton_env_or_skip

from grinfer.serving.proto import inference_pb2

CLIENT = r"""
import json, sys
import numpy as np
from tritonclient.utils import InferenceServerException

p = json.load(sys.stdin)
if p["protocol"] == "http":
    import tritonclient.http as tc
    client = tc.InferenceServerClient(p["url"])
    meta = lambda f, *a: f(*a)
    parameters = lambda r: r.get_response()["parameters"]
else:
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(p["url"])
    meta = lambda f, *a: f(*a, as_json=True)
    parameters = lambda r: {k: next(iter(v.values())) for k, v in r.get_response(as_json=True)["parameters"].items()}

def inputs(user, items):
    u = tc.InferInput("user_id", [1], "BYTES")
    u.set_data_from_numpy(np.array([user.encode()], dtype=np.object_))
    c = tc.InferInput("candidates", [len(items)], "INT64")
    c.set_data_from_numpy(np.array(items, dtype=np.int64))
    return [u, c]

def error(call):
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    return None

out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "server": meta(client.get_server_metadata), "model_ready": client.is_model_ready("grinfer_rank", "1"),
       "metadata": meta(client.get_model_metadata, "grinfer_rank"),
       "index": meta(client.get_model_repository_index)}
if isinstance(out["index"], dict):  # gRPC's answer as JSON: {"models": [...]}
    out["index"] = out["index"]["models"]
result = client.infer("grinfer_rank", inputs(p["user"], p["items"]), request_id="r1")
out["rank"] = {name: result.as_numpy(name).tolist() for name in ("probabilities", "score", "ranked")}
out["shapes"] = {name: list(result.as_numpy(name).shape) for name in ("probabilities", "score")}
out["parameters"] = parameters(result)
picked = client.infer("grinfer_rank", inputs(p["user"], p["items"]), outputs=[tc.InferRequestedOutput("score")])
out["picked"] = [picked.as_numpy("score").tolist(), picked.as_numpy("ranked") is None]
out["unknown_model"] = error(lambda: client.infer("nope", inputs(p["user"], p["items"])))
out["unknown_item"] = error(lambda: client.infer("grinfer_rank", inputs(p["user"], [p["items"][0], 99999])))
out["missing_input"] = error(lambda: client.infer("grinfer_rank", inputs(p["user"], p["items"])[:1]))
print(json.dumps(out))
"""

FIELDS = r"""
import json
from tritonclient.grpc import service_pb2
names = %s
out = {}
for name in names:
    d = service_pb2.DESCRIPTOR.message_types_by_name.get(name.split(".")[0])
    for part in name.split(".")[1:]:
        d = d.nested_types_by_name[part] if d else None
    out[name] = None if d is None else {f.name: [f.number, f.type, f.label == 3] for f in d.fields}  # 3: repeated
methods = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
out["methods"] = {m: [methods[m].input_type.full_name, methods[m].output_type.full_name] for m in %s}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton():
    return triton_env_or_skip()


def _message_names(descriptor, prefix: str = "") -> list[str]:
    names = []
    for name, message in descriptor.message_types_by_name.items() if not prefix else \
            ((n, m) for n, m in descriptor.nested_types_by_name.items() if not m.GetOptions().map_entry):
        names.append(prefix + name)
        names += _message_names(message, prefix + name + ".")
    return names


def test_our_proto_has_tritonclients_field_numbers_and_methods(triton):
    names = _message_names(inference_pb2.DESCRIPTOR)
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.run_client(FIELDS % (json.dumps(names), json.dumps([m.name for m in service.methods])))
    for name in names:
        ours = inference_pb2.DESCRIPTOR.message_types_by_name.get(name.split(".")[0])
        for part in name.split(".")[1:]:
            ours = ours.nested_types_by_name[part]
        assert theirs[name] is not None, f"tritonclient has no message {name}"
        for field in ours.fields:  # every field we declare is theirs, with the same number, type, repetition
            assert theirs[name].get(field.name) == [field.number, field.type, field.is_repeated], (name, field.name)
    assert theirs["methods"] == {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_talks_to_grinfer(live, triton, protocol):
    user, items = live.user(), items_of(live, 4, 2, 8)
    url = live.url.removeprefix("http://") if protocol == "http" else f"127.0.0.1:{live.grpc.port}"
    out = triton.run_client(CLIENT, {"protocol": protocol, "url": url, "user": user, "items": items})
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    assert out["server"]["name"] == "grinfer"
    assert out["metadata"]["name"] == "grinfer_rank" and out["metadata"]["versions"] == ["1"]
    assert {(m["name"], m["state"]) for m in out["index"]} == {("grinfer_rank", "READY"),
                                                                ("grinfer_recommend", "READY")}
    expected = v1_rank(live, user, items)
    tasks = ["ctr", "ctcvr"]
    assert out["shapes"] == {"probabilities": [3, 2], "score": [3]}
    np.testing.assert_allclose(out["rank"]["score"], [expected[i]["score"] for i in items], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["rank"]["probabilities"], [[expected[i]["probabilities"][t] for t in tasks]
                                                              for i in items], rtol=0, atol=1e-5)
    assert out["rank"]["ranked"] == list(expected)
    np.testing.assert_allclose(out["picked"][0], out["rank"]["score"], rtol=0, atol=1e-6)
    assert out["picked"][1] is True  # only the requested output came back
    assert out["parameters"]["tasks"] == "ctr,ctcvr" and out["parameters"]["cache"] in ("hit", "partial", "miss")
    codes = {"http": ("404", "400"), "grpc": ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT")}[protocol]
    assert out["unknown_model"]["status"] == codes[0] and "unknown model 'nope'" in out["unknown_model"]["message"]
    assert out["unknown_item"]["status"] == codes[1]
    assert "inputs.candidates.1: item 99999 is not in the catalogue" in out["unknown_item"]["message"]
    assert out["missing_input"]["status"] == codes[1] and "inputs.candidates" in out["missing_input"]["message"]
