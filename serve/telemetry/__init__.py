"""Telemetry: OpenTelemetry traces, Prometheus metrics (through Ray's exporter) and
structured JSON logs. A stage adds its span with `stage(...)`, its counts with
`metrics().inc(...)`, and its facts about the request with `annotate(...)`."""

from .logs import setup_logging
from .metrics import CATALOGUE, Metrics, metrics
from .requests import RequestRecord, annotate, current_request, request_scope
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
    "current_request",
    "current_trace_id",
    "metrics",
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
