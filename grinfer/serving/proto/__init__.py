"""grinfer's gRPC API: grinfer.proto and the Python stubs generated from it.

grinfer_pb2.py, grinfer_pb2_grpc.py and grinfer_pb2.pyi are generated and committed; after editing
grinfer.proto run `python -m grinfer.serving.proto.generate` (or scripts/gen_proto.sh). The test suite
fails while the committed stubs differ from what the .proto generates.
"""
