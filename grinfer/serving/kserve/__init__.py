"""KServe v2 / Open Inference Protocol: the protocol Triton, KServe, Seldon and OpenVINO speak, over
grinfer's service (REST routes under /v2 in rest.py, inference.GRPCInferenceService in grpc.py; the models
and their tensors in models.py; docs/protocols.md)."""
