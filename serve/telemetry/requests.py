"""One request's telemetry: its server span, what the stages learn about it, and
at the end exactly one metrics update and one JSON log line.

Transports open the scope (HTTP middleware, gRPC servicer); stages annotate it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode

from .metrics import Metrics
from .tracing import context_from, span_ids, tracer

access_log = logging.getLogger("imagegen.access")

# Codes that mean policy said no (safety, quota), not that the request was malformed.
BLOCKED_CODES = frozenset({"prompt_blocked", "image_blocked", "quota_exceeded",
                           "rate_limited"})


@dataclass
class RequestRecord:
    """What the log line and the metrics say about one request."""

    request_id: str
    trace_id: str
    route: str
    transport: str = "http"  # http, openai (its route on HTTP) or grpc
    generation: bool = True  # a generation request: counted in the request metrics
    principal: str = "anonymous"
    tier: str = ""
    model: str = ""
    revision: str = ""
    images: int = 0
    cost_units: float = 0.0
    cache_hit: bool = False
    fallback: bool = False
    # The HTTP status; on gRPC the one the error table gives the same answer on HTTP
    # (so outcomes read alike), and grpc_status the status the caller got.
    status: int = 0
    grpc_status: str = ""
    code: str = ""
    queue_ms: float | None = None
    generate_ms: float | None = None
    duration_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        if self.code == CLIENT_CLOSED:
            return "cancelled"
        if self.code in BLOCKED_CODES:
            return "blocked"
        if self.status >= 500 or (self.code and not self.status):
            return "failed"
        if self.status >= 400 or self.code:
            return "rejected"
        return "ok"


# The caller went away (disconnect, proxy timeout): not the service's failure.
CLIENT_CLOSED = "client_closed"

_current: ContextVar[RequestRecord | None] = ContextVar("imagegen_request", default=None)


def annotate(**facts: Any) -> None:
    """Record facts a stage learned (tier, model, revision, images, ...) on the
    current request and its server span. A no-op outside a request."""
    rec = _current.get()
    if rec is None:
        return
    for key, value in facts.items():
        if key in RequestRecord.__dataclass_fields__ and key != "extra":
            setattr(rec, key, value)
        else:
            rec.extra[key] = value


@contextmanager
def request_scope(
    name: str, *, request_id: str, route: str, carrier: Mapping[str, str] | None,
    metrics: Metrics, log: bool = True, generation: bool = True, transport: str = "http",
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[RequestRecord]:
    """Open the request's SERVER span (child of the caller's traceparent, if any).
    On exit: span attributes and status, one metrics update, one log line."""
    parent = context_from(dict(carrier) if carrier else None)
    with tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    ) as span:
        trace_id, _ = span_ids(span)
        rec = RequestRecord(request_id=request_id, trace_id=trace_id, route=route,
                            transport=transport, generation=generation)
        token = _current.set(rec)
        t0 = time.perf_counter()
        try:
            yield rec
        except asyncio.CancelledError:
            rec.code = rec.code or CLIENT_CLOSED
            raise
        except BaseException as e:
            rec.code = rec.code or getattr(e, "code", "internal")
            span.record_exception(e)
            raise
        finally:
            rec.duration_ms = (time.perf_counter() - t0) * 1e3
            _current.reset(token)
            _finish_span(span, rec)
            if log:
                _record(rec, metrics)


def _finish_span(span, rec: RequestRecord) -> None:
    attrs = {
        "imagegen.request_id": rec.request_id,
        "imagegen.outcome": rec.outcome,
        "imagegen.cache_hit": rec.cache_hit,
        "imagegen.fallback": rec.fallback,
    }
    if rec.grpc_status:
        attrs["rpc.grpc.status_code"] = grpc.StatusCode[rec.grpc_status].value[0]
    elif rec.status:
        attrs["http.response.status_code"] = rec.status
    if rec.code:
        attrs["error.type"] = rec.code
    span.set_attributes(attrs)
    # Server spans: only 5xx is the server's fault (OTel HTTP conventions).
    if rec.outcome == "failed":
        span.set_status(Status(StatusCode.ERROR, rec.code))


def _record(rec: RequestRecord, metrics: Metrics) -> None:
    _log(rec)
    if review := rec.extra.get("review"):  # a reviewer's decision (service.review_decide)
        metrics.inc("imagegen_review_decisions_total", decision=review["decision"],
                    reason=review["reason"])
    if not rec.generation:
        return
    tier, model = rec.tier or "none", rec.model or "none"
    metrics.inc("imagegen_requests_total", tier=tier, model=model,
                revision=rec.revision or "none", outcome=rec.outcome, code=rec.code or "ok",
                transport=rec.transport)
    metrics.observe("imagegen_request_duration_seconds", rec.duration_ms / 1e3,
                    tier=tier, model=model, outcome=rec.outcome, transport=rec.transport)
    if rec.outcome == "ok" and rec.images:
        metrics.inc("imagegen_images_total", rec.images, tier=tier, model=model,
                    revision=rec.revision)
        if rec.cost_units:
            metrics.inc("imagegen_cost_units_total", rec.cost_units, tier=tier, model=model)
        if rec.cache_hit:
            metrics.inc("imagegen_cache_hits_total", tier=tier)
    if safety := rec.extra.get("image_safety"):  # stage 9's verdicts (service._check_images)
        for f in safety.get("flagged", []):
            metrics.inc("imagegen_image_verdicts_total", tier=tier, action=f["action"],
                        category=f["category"])
        if n := safety.get("allow"):
            metrics.inc("imagegen_image_verdicts_total", n, tier=tier, action="allow",
                        category="none")
        if n := safety.get("unchecked"):  # `error`: the classifier failed, fail-open
            metrics.inc("imagegen_image_verdicts_total", n, tier=tier, action="unchecked",
                        category="error" if "error" in safety else "none")
    if blocked := rec.extra.get("blocked"):  # a safety stage said no (service.py)
        metrics.inc("imagegen_blocked_total", tier=tier, stage=blocked["stage"],
                    reason=blocked["reason"])
    if quota := rec.extra.get("quota"):  # the budget stage's outcome (service._reserve)
        metrics.inc("imagegen_quota_units_total", quota["units"], plan=quota["plan"],
                    outcome=quota["outcome"], reason=quota["reason"])


def _log(rec: RequestRecord) -> None:
    fields = asdict(rec)
    if not fields["extra"]:  # stages' own facts stay nested: no clash with LogRecord
        del fields["extra"]
    fields["outcome"] = rec.outcome
    level = logging.ERROR if rec.outcome == "failed" else logging.INFO
    access_log.log(level, "request", extra=fields)
