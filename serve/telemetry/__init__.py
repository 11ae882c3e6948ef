"""Telemetry: OpenTelemetry traces, Prometheus metrics (through Ray's exporter) and
structured JSON logs. A stage adds its span with `stage(...)` and its facts about
the request with `annotate(...)`; the request's one metrics update and log line
carry them. Each deployment records its own series through the `Metrics` it made."""

from .logs import setup_logging
from .metrics import CATALOGUE, Metrics
from .requests import RequestRecord, annotate, request_scope
from .tracing import (
    context_from,
    current_trace_id,
    setup_tracing,
    stage,
    traceparent,
    tracer,
)

__all__ = [
    "CATALOGUE",
    "Metrics",
    "RequestRecord",
    "annotate",
    "context_from",
    "current_trace_id",
    "request_scope",
    "setup",
    "setup_logging",
    "setup_tracing",
    "stage",
    "traceparent",
    "tracer",
]


def setup(component: str) -> None:
    """Once per process (ingress or model replica): tracing from OTEL_*, JSON logs."""
    setup_tracing(component)
    setup_logging()
