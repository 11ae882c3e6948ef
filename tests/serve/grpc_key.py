"""A gRPC channel that sends an API key with every unary call, as a client would
(`authorization: Bearer <key>` metadata). Imported by tests/serve modules."""

from __future__ import annotations

import grpc


class _Key(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, key: str) -> None:
        self.key = key

    def intercept_unary_unary(self, continuation, details, request):
        md = [*(details.metadata or []), ("authorization", f"Bearer {self.key}")]
        return continuation(details._replace(metadata=md), request)


def keyed_channel(target: str, key: str) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(target), _Key(key))
