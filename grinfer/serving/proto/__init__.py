"""grinfer's gRPC APIs: grinfer.proto (grinfer.v1.Recommender), inference.proto (the KServe v2 / Open
Inference Protocol's inference.GRPCInferenceService) and the Python stubs generated from them.

<name>_pb2.py, <name>_pb2_grpc.py and <name>_pb2.pyi are generated and committed; after editing a .proto
run `python -m grinfer.serving.proto.generate` (or scripts/gen_proto.sh). The test suite fails while the
committed stubs differ from what the .proto files generate.
"""
