"""Telemetry through the HTTP app in-process: spans (SDK in-memory exporter),
metrics (the catalogue in a prometheus_client registry) and JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serve.deployments.ingress import Coalescing, HandleBackend
from serve.engines.base import Generated, Job
from serve.ingress.http import build_http_app
from serve.telemetry import CATALOGUE, Metrics, stage
from serve.telemetry.logs import setup_logging

PROMPT = "a secret red fox"
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


async def _ready():
    return True, {}


@pytest.fixture
def logs():
    stream = io.StringIO()
    setup_logging(stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    setup_logging(stream=io.StringIO())


@pytest.fixture
def client(service, metrics, api_key) -> TestClient:
    app = build_http_app(service, _ready, max_body_bytes=4096, metrics=metrics)
    return TestClient(app, raise_server_exceptions=False,
                      headers={"Authorization": f"Bearer {api_key}"})


def samples(metrics: Metrics, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one exported series name."""
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_one_trace_per_request_with_a_span_per_stage(client, spans):
    r = client.post("/v1/images", json={"prompt": PROMPT, "seed": 1, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    finished = spans.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in finished} == {body["trace_id"]}
    assert r.headers["x-trace-id"] == body["trace_id"]
    by_name = {s.name: s for s in finished}
    server = by_name["POST /v1/images"]
    assert server.parent is None
    for child in ("imagegen.authenticate", "imagegen.validate", "imagegen.route",
                  "imagegen.generate", "imagegen.encode"):
        assert by_name[child].parent.span_id == server.context.span_id, child
    gen = by_name["imagegen.generate"].attributes
    assert gen["gen_ai.operation.name"] == "generate_content"
    assert gen["gen_ai.output.type"] == "image"
    assert gen["gen_ai.request.model"] == "tiny-draft"
    assert gen["imagegen.tier"] == "draft"
    assert (gen["imagegen.images"], gen["imagegen.seed_count"]) == (2, 2)
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["imagegen.outcome"] == "ok"


def test_inbound_traceparent_is_honoured(client, spans):
    tp = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    r = client.post("/v1/images", json={"prompt": "x"}, headers={"traceparent": tp})
    assert r.json()["trace_id"] == PARENT_TRACE
    server = next(s for s in spans.get_finished_spans() if s.name == "POST /v1/images")
    assert format(server.parent.span_id, "016x") == PARENT_SPAN
    assert server.parent.is_remote


def test_unsampled_parent_still_returns_its_trace_id(client, spans):
    tp = f"00-{PARENT_TRACE}-{PARENT_SPAN}-00"  # sampled flag off: nothing exported
    r = client.post("/v1/images", json={"prompt": "x"}, headers={"traceparent": tp})
    assert r.status_code == 200
    assert r.json()["trace_id"] == PARENT_TRACE == r.headers["x-trace-id"]
    assert spans.get_finished_spans() == ()


def test_errors_carry_the_trace_id_and_4xx_is_not_a_server_error(client, spans):
    r = client.post("/v1/images", json={"prompt": "x", "tier": "nope"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "unknown_tier"
    assert err["trace_id"] == r.headers["x-trace-id"]
    server = next(s for s in spans.get_finished_spans() if s.name == "POST /v1/images")
    assert server.attributes["error.type"] == "unknown_tier"
    assert server.status.is_unset or server.status.is_ok


def test_prompt_is_never_recorded(client, spans, logs):
    client.post("/v1/images", json={"prompt": PROMPT, "negative_prompt": "blurry secret"})
    for s in spans.get_finished_spans():
        assert not any("secret" in str(v) for v in s.attributes.values()), s.name
    assert logs() and not any("secret" in json.dumps(line) for line in logs())


def test_metrics_count_requests_images_and_cost(client, metrics):
    for _ in range(3):
        assert client.post("/v1/images", json={"prompt": "x", "n": 2}).status_code == 200
    assert client.post("/v1/images", json={"prompt": "x", "tier": "final"}).status_code == 200
    assert client.post("/v1/images", json={"prompt": ""}).status_code == 422
    assert client.post("/v1/images", content=b"{", headers={
        "content-type": "application/json"}).status_code == 400
    client.get("/healthz")
    reqs = samples(metrics, "imagegen_requests_total")
    by_outcome: dict[tuple, float] = {}
    for labels, v in reqs.items():
        d = dict(labels)
        key = (d["tier"], d["outcome"], d["code"])
        by_outcome[key] = by_outcome.get(key, 0) + v
    assert by_outcome == {
        ("draft", "ok", "ok"): 3, ("final", "ok", "ok"): 1,
        ("none", "rejected", "invalid_request"): 1, ("none", "rejected", "malformed_body"): 1,
    }
    images = {dict(k)["tier"]: v for k, v in samples(metrics, "imagegen_images_total").items()}
    assert images == {"draft": 6, "final": 1}
    # draft 64x48 x 2 images x weight 1; final 96x96 x 1 x weight 1 (test routing)
    cost = {dict(k)["tier"]: v for k, v in samples(metrics, "imagegen_cost_units_total").items()}
    assert cost["draft"] == pytest.approx(3 * 2 * 64 * 48 / 1e6)
    counts = samples(metrics, "imagegen_request_duration_seconds_count")
    assert sum(counts.values()) == 6  # /healthz is not a generation request


def test_one_json_log_line_per_api_request(client, logs):
    r = client.post("/v1/images", json={"prompt": "x", "tier": "final"},
                    headers={"x-request-id": "req-42"})
    client.post("/v1/images", json={"prompt": "x", "steps": 10_000})
    client.get("/healthz")
    lines = [line for line in logs() if line["logger"] == "imagegen.access"]
    assert len(lines) == 2
    ok, bad = lines
    assert ok["request_id"] == "req-42" == r.json()["id"]
    assert ok["trace_id"] == r.json()["trace_id"]
    assert (ok["tier"], ok["model"], ok["outcome"], ok["status"]) == (
        "final", "tiny-final", "ok", 200)
    assert ok["revision"] == r.json()["revision"]
    assert ok["principal"] == "tester"  # the key's principal, never the key
    assert ok["duration_ms"] > 0 and ok["generate_ms"] >= 0
    assert (bad["outcome"], bad["code"], bad["status"]) == ("rejected", "invalid_request", 422)
    assert bad["level"] == "INFO"


def test_every_log_line_carries_the_trace_id(logs, spans):
    with stage("custom") as span:
        logging.getLogger("imagegen.test").warning("inside")
    line = next(x for x in logs() if x["msg"] == "inside")
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")


def test_handle_call_carries_each_requests_own_traceparent(spans):
    class Handle:
        def __init__(self):
            self.calls = []

        def options(self, method_name, **_):
            return self

        async def remote(self, calls):
            self.calls.extend(calls)
            return [Generated([], 0.0, 0.0, 1) for _ in calls]

    async def main():
        h = Handle()
        backend = HandleBackend({"m": h}, {"m": Coalescing(8, 1, None)})

        async def one(i):
            with stage(f"request-{i}"):
                await backend.generate("m", [Job("p", "", 8, 8, 1, 1.0, i)])

        await asyncio.gather(one(0), one(1), one(2))
        return h.calls

    calls = asyncio.run(main())
    finished = spans.get_finished_spans()
    assert len(calls) == 3
    for call in calls:
        request = next(s for s in finished if s.name == f"imagegen.request-{call.jobs[0].seed}")
        client_span = next(s for s in finished if s.name == "imagegen.model.call"
                           and s.parent.span_id == request.context.span_id)
        _, trace_id, span_id, _ = call.traceparent.split("-")
        assert trace_id == format(client_span.context.trace_id, "032x")
        assert span_id == format(client_span.context.span_id, "016x")
    assert len({c.traceparent.split("-")[1] for c in calls}) == 3  # three traces


def test_catalogue_follows_prometheus_naming():
    for name, spec in CATALOGUE.items():
        assert name.startswith("imagegen_")
        assert (spec.kind == "counter") == name.endswith("_total"), name
        if spec.kind == "histogram" and "seconds" in name:
            assert spec.buckets[0] <= 0.05 and spec.buckets[-1] >= 120, name


def test_recording_outside_the_catalogue_fails(metrics):
    with pytest.raises(KeyError):
        metrics.inc("imagegen_made_up_total")
    with pytest.raises(TypeError):
        metrics.inc("imagegen_model_ready")


def test_spans_record_only_when_something_listens():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from serve.telemetry.tracing import _Listened

    sampler = _Listened(ALWAYS_ON, listened=False)
    tracer = TracerProvider(sampler=sampler).get_tracer("t")
    with tracer.start_as_current_span("quiet") as span:
        ctx = span.get_span_context()
        assert not span.is_recording() and ctx.is_valid  # the trace id still flows
        with tracer.start_as_current_span("child") as child:
            assert child.get_span_context().trace_id == ctx.trace_id
    sampler.listened = True
    with tracer.start_as_current_span("heard") as span:
        assert span.is_recording()


class _Raising:
    async def generate(self, model, jobs):
        raise ValueError("secret detail")


def test_unhandled_error_is_answered_logged_and_counted_in_its_trace(lock, routing, metrics,
                                                                      logs, auth, api_key):
    from serve.routing import LiveRouting
    from serve.service import ImageService

    service = ImageService(lock, LiveRouting(routing, lock, "file test"), _Raising(), auth=auth)
    app = build_http_app(service, _ready, max_body_bytes=4096, metrics=metrics)
    r = TestClient(app, raise_server_exceptions=False).post(
        "/v1/images", json={"prompt": "x"}, headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 500
    assert r.json()["error"]["trace_id"] == r.headers["x-trace-id"]
    (line,) = [x for x in logs() if x["logger"] == "imagegen.access"]
    assert (line["status"], line["code"], line["outcome"], line["level"]) == (
        500, "internal", "failed", "ERROR")
    assert line["trace_id"] == r.headers["x-trace-id"]
    failed = {dict(k)["code"]: v for k, v in samples(metrics, "imagegen_requests_total").items()}
    assert failed == {"internal": 1}


def test_only_generations_are_counted_as_requests(client, metrics, logs):
    client.get("/v1/models")
    client.get("/v1/nothing")
    assert samples(metrics, "imagegen_requests_total") == {}
    assert len([x for x in logs() if x["logger"] == "imagegen.access"]) == 2  # still logged


def test_a_caller_that_went_away_is_not_a_failure(metrics):
    from serve.telemetry import request_scope

    async def main():
        with request_scope("POST /v1/images", request_id="r", route="/v1/images", carrier={},
                           metrics=metrics):
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    (labels,) = samples(metrics, "imagegen_requests_total")
    assert dict(labels)["outcome"] == "cancelled" and dict(labels)["code"] == "client_closed"
