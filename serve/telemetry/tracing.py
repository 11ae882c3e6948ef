"""OpenTelemetry tracing, configured by the standard OTEL_* variables.

One TracerProvider per process. Sampling: OTEL_TRACES_SAMPLER when set (the SDK
reads it), else parent-based trace-id ratio with OTEL_TRACES_SAMPLER_ARG (default
1.0). Export: OTEL_TRACES_EXPORTER (otlp, console, none; comma-separated); when it
is unset, OTLP if an OTLP endpoint is configured, else nothing. OTLP speaks
OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (http/protobuf by default, or grpc) and reads
its endpoint, headers and timeouts from the environment itself.

Why not Ray Serve's built-in tracing: it is configured by RAY_SERVE_TRACING_*
(default ratio 0.01, file exporter), and it carries one trace context per handle
call, while the ingress merges several requests (several traces) into one call.
So each request carries its own W3C traceparent to the model replica.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE_NAME = "imagegen"
tracer = trace.get_tracer("imagegen")  # a proxy: it follows the provider set below
_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_provider: TracerProvider | None = None


def setup_tracing(component: str) -> TracerProvider:
    """Install this process's provider (idempotent); returns it."""
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        attributes = {"imagegen.component": component}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = SERVICE_NAME
        exporters = _exporters()
        sampler = _Listened(_sampler(), listened=bool(exporters))
        provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
        provider.imagegen_sampler = sampler
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def add_span_processor(processor: SpanProcessor) -> None:
    """Tests attach an in-memory exporter here; spans are recorded from now on."""
    provider = setup_tracing("test")
    provider.add_span_processor(processor)
    provider.imagegen_sampler.listened = True


def _sampler() -> Sampler:
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        return _get_from_env_or_default()
    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    return ParentBasedTraceIdRatio(ratio)


class _Listened(Sampler):
    """The configured sampler while spans go somewhere; otherwise no span records.
    Trace ids still flow (every answer and log line carries one); recording spans
    nobody exports cost ~6% of throughput on 2 cores at 32 clients."""

    def __init__(self, inner: Sampler, *, listened: bool) -> None:
        self.inner = inner
        self.listened = listened

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                      links=None, trace_state=None) -> SamplingResult:
        if not self.listened:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes,
                                        links, trace_state)

    def get_description(self) -> str:
        return f"Listened({self.inner.get_description()})"


def _exporters() -> list[SpanExporter]:
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    out: list[SpanExporter] = []
    for name in filter(None, (n.strip().lower() for n in names.split(","))):
        if name == "otlp":
            out.append(_otlp())
        elif name == "console":
            out.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    return out


def _otlp() -> SpanExporter:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")
    return OTLPSpanExporter()


@contextmanager
def stage(name: str, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any) -> Iterator[Span]:
    """A span for one stage of the request path: `imagegen.<name>`."""
    with tracer.start_as_current_span(f"imagegen.{name}", kind=kind, attributes=attributes) as s:
        yield s


def traceparent() -> str | None:
    """The current span as a W3C traceparent, to carry across a handle call."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def context_from(carrier: dict[str, str] | str | None) -> Context | None:
    """The remote parent from headers (or a bare traceparent); None starts a new trace."""
    if not carrier:
        return None
    if isinstance(carrier, str):
        carrier = {"traceparent": carrier}
    return _propagator.extract(carrier)


def current_trace_id() -> str:
    """32 hex digits of the current trace ('' outside any span)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def span_ids(span: Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
