"""A tritonclient script, run in the Triton environment (tests/tritonserver_env.py), never in .venv.

stdin: {"url": HOST:PORT, "protocol": "http" | "grpc", "op": "infer" | "stats" | "health" | "load", ...};
stdout: the answer as JSON. `infer` sends each of "requests" (tensor name -> [datatype, values]) to "model"
and returns its outputs or Triton's error; `load` runs "rounds" requests from "clients" threads and returns
each request's latency in seconds.
"""

import json
import sys
import threading
import time

import numpy as np

DTYPES = {"INT64": np.int64, "FP32": np.float32, "BYTES": np.object_}


def client_module(protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def infer(module, client, model, request):
    inputs = []
    for name, (dtype, values) in request.items():
        array = np.array([v.encode() for v in values] if dtype == "BYTES" else values, dtype=DTYPES[dtype])
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    try:
        result = client.infer(model, inputs)
    except module.InferenceServerException as exc:
        return {"error": exc.message(), "status": str(exc.status())}
    outputs = {}
    for spec in result.get_response()["outputs"] if isinstance(result.get_response(), dict) else \
            result.get_response().outputs:
        name = spec["name"] if isinstance(spec, dict) else spec.name
        value = result.as_numpy(name)
        outputs[name] = [v.decode() for v in value.reshape(-1)] if value.dtype == np.object_ else value.tolist()
    return {"outputs": outputs}


def load(module, url, model, requests, clients, rounds):
    latencies, lock = [], threading.Lock()

    def loop(index):
        client = module.InferenceServerClient(url)
        for i in range(rounds):
            start = time.perf_counter()
            answer = infer(module, client, model, requests[(index + i * clients) % len(requests)])
            took = time.perf_counter() - start
            if "error" in answer:
                raise RuntimeError(answer["error"])
            with lock:
                latencies.append(took)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "seconds": time.perf_counter() - start}


def main():
    job = json.load(sys.stdin)
    module = client_module(job["protocol"])
    client = module.InferenceServerClient(job["url"])
    op = job["op"]
    if op == "infer":
        answer = [infer(module, client, job["model"], r) for r in job["requests"]]
    elif op == "stats":
        stats = client.get_inference_statistics(job["model"])
        if job["protocol"] == "grpc":
            from google.protobuf.json_format import MessageToDict

            stats = MessageToDict(stats, preserving_proto_field_name=True)
        answer = stats
    elif op == "health":
        answer = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                  "models": {m: client.is_model_ready(m) for m in job["models"]}}
    else:
        answer = load(module, job["url"], job["model"], job["requests"], job["clients"], job["rounds"])
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
