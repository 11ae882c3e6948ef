"""Telemetry on the real stack: one trace across the ingress and model replica
processes (received over OTLP), and Ray's real metrics endpoint scraped and parsed."""

from __future__ import annotations

import time

import httpx
import pytest
from grpc_key import keyed_channel
from prometheus_client.parser import text_string_to_metric_families

from serve.telemetry.metrics import CATALOGUE, RAY_NAMESPACE

pytestmark = pytest.mark.serve

PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
STAGES = {"POST /v1/images", "imagegen.authenticate", "imagegen.validate", "imagegen.route", "imagegen.generate",
          "imagegen.model.call", "imagegen.model.generate", "imagegen.pipeline",
          "imagegen.encode"}


def test_one_trace_spans_ingress_and_model_replica(client, otlp):
    r = client.post("/v1/images", json={"prompt": "a heron", "tier": "final", "seed": 5},
                    headers={"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"})
    assert r.status_code == 200, r.text
    assert r.json()["trace_id"] == PARENT_TRACE == r.headers["x-trace-id"]
    spans = {s["name"]: s for s in otlp.trace(PARENT_TRACE, STAGES)}
    assert STAGES <= set(spans), sorted(spans)

    def parent(name: str) -> str:
        return next(n for n, s in spans.items() if s["span_id"] == spans[name]["parent_span_id"])

    root = spans["POST /v1/images"]
    assert root["parent_span_id"] == PARENT_SPAN  # the caller's span
    assert parent("imagegen.generate") == "POST /v1/images"
    assert parent("imagegen.model.call") == "imagegen.generate"
    assert parent("imagegen.model.generate") == "imagegen.model.call"
    assert parent("imagegen.pipeline") == "imagegen.model.generate"
    # Two processes: the ingress replica and the tiny-final model replica.
    assert root["resource"]["imagegen.component"] == "ingress"
    model_span = spans["imagegen.model.generate"]
    assert model_span["resource"]["imagegen.component"] == "model"
    assert model_span["attributes"]["gen_ai.request.model"] == "tiny-final"
    assert model_span["attributes"]["imagegen.revision"] == r.json()["revision"]
    assert spans["imagegen.generate"]["attributes"]["gen_ai.output.type"] == "image"
    assert not any("heron" in str(s["attributes"]) for s in spans.values())


def test_a_grpc_call_is_one_trace_too(stack, stack_settings, otlp, api_key):
    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    trace_id = "1bf7651916cd43dd8448eb211c80319d"
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
        r = pb_grpc.ImagesStub(ch).Generate(
            pb.GenerateRequest(prompt="a heron", seed=5), timeout=30,
            metadata=[("traceparent", f"00-{trace_id}-{PARENT_SPAN}-01")])
    assert r.trace_id == trace_id
    root_name = "imagegen.v1.Images/Generate"
    want = {root_name} | STAGES - {"POST /v1/images"}
    spans = {s["name"]: s for s in otlp.trace(trace_id, want)}
    assert want <= set(spans), sorted(spans)
    root = spans[root_name]
    assert root["parent_span_id"] == PARENT_SPAN and root["kind"] == 2  # SERVER
    assert root["attributes"]["rpc.system"] == "grpc"
    assert root["attributes"]["rpc.grpc.status_code"] == 0
    assert "http.response.status_code" not in root["attributes"]
    generate = spans["imagegen.generate"]
    assert generate["parent_span_id"] == root["span_id"]
    assert spans["imagegen.model.generate"]["resource"]["imagegen.component"] == "model"


def scrape(port: int) -> dict[str, list]:
    """Series name (Ray's namespace stripped) -> [(labels, value)]."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(RAY_NAMESPACE + "imagegen_"):
                out.setdefault(s.name.removeprefix(RAY_NAMESPACE), []).append((s.labels, s.value))
    return out


def settled(port: int) -> dict[str, list]:
    """A scrape that earlier tests' requests no longer change (Ray reports every 1 s)."""
    last = scrape(port)
    for _ in range(20):
        time.sleep(1.5)
        now = scrape(port)
        if now == last:
            return now
        last = now
    return last


def total(series: dict[str, list], name: str, **match: str) -> float:
    return sum(v for labels, v in series.get(name, [])
               if all(labels.get(k) == x for k, x in match.items()))


def test_metrics_endpoint_counts_requests(client, stack_settings, api_key):
    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    port = stack_settings["metrics_port"]
    before = settled(port)
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
        pb_grpc.ImagesStub(ch).Generate(pb.GenerateRequest(prompt="x", tier="final"), timeout=30)
    for seed in range(4):
        assert client.post("/v1/images", json={"prompt": "x", "n": 2, "seed": seed}).status_code \
            == 200
    assert client.post("/v1/images", json={"prompt": "x", "tier": "final"}).status_code == 200
    assert client.post("/v1/images", json={"prompt": "x", "steps": 99}).status_code == 422
    expect = {
        ("imagegen_requests_total", (("tier", "draft"), ("outcome", "ok"))): 4,
        ("imagegen_requests_total", (("tier", "final"), ("outcome", "ok"))): 2,
        ("imagegen_requests_total", (("transport", "grpc"),)): 1,
        ("imagegen_requests_total", (("transport", "http"),)): 6,
        ("imagegen_requests_total", (("code", "limit_exceeded"),)): 1,
        ("imagegen_images_total", (("tier", "draft"),)): 8,
        ("imagegen_request_duration_seconds_count", (("tier", "draft"),)): 4,
        ("imagegen_queue_wait_seconds_count", (("model", "tiny-draft"),)): 4,
        ("imagegen_pipeline_images_total", (("model", "tiny-draft"),)): 8,  # each image once
    }
    deadline = time.monotonic() + 30  # Ray reports every second here (10 s by default)
    while True:
        after = scrape(port)
        got = {key: total(after, key[0], **dict(key[1])) - total(before, key[0], **dict(key[1]))
               for key in expect}
        if got == expect or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expect
    assert total(after, "imagegen_cost_units_total", tier="final") > 0
    assert total(after, "imagegen_pipeline_seconds_count", model="tiny-draft") >= 1
    ready = {labels["model"]: v for labels, v in after["imagegen_model_ready"]}
    assert ready["tiny-draft"] == 1 and ready["tiny-final"] == 1 and ready["broken"] == 0
    assert all(v > 0 for _, v in after["imagegen_model_load_seconds"])
    assert {labels["tier"] for labels, _ in after["imagegen_fallback_active"]} >= {"draft"}
    for name in after:  # everything exported is declared (histograms add suffixes)
        base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        assert base in CATALOGUE, name
