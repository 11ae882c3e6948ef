"""Generated gRPC stubs of proto/imagegen/v1 (scripts/gen_proto.py; do not edit)."""
