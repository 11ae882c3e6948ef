"""A real gRPC client against the real local stack: the ingress replica's own gRPC
server (direct ingress) and Serve's gRPC proxy, the same answers as HTTP, errors
from the one table, deadlines and cancellation, reflection and health."""

from __future__ import annotations

import base64
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_key import keyed_channel
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serve.ingress.grpc import CODE_KEY, DETAILS_KEY, RETRY_KEY, SERVICE, TRACE_KEY
from serve.ingress.proto import images_pb2 as pb
from serve.ingress.proto import images_pb2_grpc as pb_grpc
from serve.local import DIRECT_INGRESS_PORTS

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def channel(stack, stack_settings, api_key):
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.ImagesStub(channel)


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_generate_gives_the_same_images_as_http(client, stack_settings, api_key, via):
    port = stack_settings["grpc_port"] + (DIRECT_INGRESS_PORTS if via == "proxy" else 0)
    with keyed_channel(f"127.0.0.1:{port}", api_key) as ch:
        r, call = pb_grpc.ImagesStub(ch).Generate.with_call(
            pb.GenerateRequest(prompt="a red fox", n=2, seed=41, tier="final"), timeout=60)
    trailers = dict(call.trailing_metadata())
    assert (r.tier, r.model, len(r.images)) == ("final", "tiny-final", 2)
    assert [i.seed for i in r.images] == [41, 42] and r.images[0].data[:4] == b"\x89PNG"
    assert trailers["request_id"] == r.id and trailers[TRACE_KEY] == r.trace_id
    http = client.post("/v1/images", json={"prompt": "a red fox", "n": 2, "seed": 41,
                                           "tier": "final"}).json()
    assert [i.data for i in r.images] == [base64.b64decode(i["b64_json"]) for i in http["images"]]
    assert r.revision == http["revision"]


def test_list_models_is_the_models_route(client, stub):
    got = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    for m in client.get("/v1/models").json()["models"]:
        g = got[m["name"]]
        assert (g.revision, list(g.tiers), g.limits.max_steps, g.defaults.width) == (
            m["revision"], m["tiers"], m["limits"]["max_steps"], m["defaults"]["width"])


@pytest.mark.parametrize(("raw", "status", "code", "retry"), [
    (pb.GenerateRequest(prompt="x", n=9).SerializeToString(), "INVALID_ARGUMENT",
     "invalid_request", None),
    (b"\x0a\x05ab", "INVALID_ARGUMENT", "malformed_body", None),
    (pb.GenerateRequest(prompt="x", steps=99).SerializeToString(), "OUT_OF_RANGE",
     "limit_exceeded", None),
    (pb.GenerateRequest(prompt="x", tier="broken").SerializeToString(), "UNAVAILABLE",
     "model_unavailable", "5"),
], ids=["invalid", "malformed", "limit", "unavailable"])
def test_errors_through_ray_keep_status_code_and_no_traceback(channel, raw, status, code, retry):
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Generate")(raw, timeout=30)
    e = info.value
    trailers = dict(e.trailing_metadata())
    assert e.code() == grpc.StatusCode[status] and trailers[CODE_KEY] == code
    assert trailers.get(RETRY_KEY) == retry
    assert "Traceback" not in e.details() and "ray" not in e.details().lower()
    assert "request_id" in trailers and (code != "invalid_request" or DETAILS_KEY in trailers)


def _slow() -> pb.GenerateRequest:
    # About 1.2 s of tiny-draft work on one thread here (256x256 would be 12 s).
    return pb.GenerateRequest(prompt="slow", size="128x128", steps=16, seed=1)


def test_a_deadline_is_honoured_and_the_request_counted_cancelled(stub, stack_settings):
    from test_stack_telemetry import scrape, total

    port = stack_settings["metrics_port"]
    before = total(scrape(port), "imagegen_requests_total", transport="grpc",
                   outcome="cancelled")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(_slow(), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 1.5
    future = stub.Generate.future(_slow(), timeout=30)
    time.sleep(0.3)
    assert future.cancel()  # the client's own cancel
    deadline = time.monotonic() + 20
    while True:  # both reached the ingress as cancellations (Ray reports every 1 s here)
        now = total(scrape(port), "imagegen_requests_total", transport="grpc",
                    outcome="cancelled")
        if now - before >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert now - before == 2
    r = stub.Generate(pb.GenerateRequest(prompt="after", seed=2), timeout=30)
    assert r.images  # the service is fine afterwards


def test_reflection_lists_and_describes_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    images = next(f for f in files if f.package == "imagegen.v1")
    methods = {m.name for s in images.service for m in s.method}
    assert methods == {"Generate", "ListModels", "GetQuota", "ListTemplates", "GetImage",
                       "Reroll", "SubmitBatch", "GetBatch", "ListBatches", "CancelBatch",
                       "GetBatchResults"}


def test_health_says_serving_exactly_when_readyz_is_200(client, channel):
    # This stack routes a tier to a broken revision: /readyz is 503, so NOT_SERVING.
    # (tests/serve/test_failover_e2e.py shows SERVING beside a 200.)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        ready = client.get("/readyz").status_code == 200
        assert got.status == (health_pb2.HealthCheckResponse.SERVING if ready
                              else health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not ready


def test_pinning_where_it_is_not_allowed_is_permission_denied_on_every_transport(client, stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt="x", model="tiny-final"), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(info.value.trailing_metadata())[CODE_KEY] == "forbidden"
    r = client.post("/v1/images", json={"prompt": "x", "model": "tiny-final"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_no_key_is_unauthenticated_and_health_stays_open(stack, stack_settings):
    with grpc.insecure_channel(f"127.0.0.1:{stack_settings['grpc_port']}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ImagesStub(ch).Generate(pb.GenerateRequest(prompt="x"), timeout=30)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(info.value.trailing_metadata())[CODE_KEY] == "unauthenticated"
