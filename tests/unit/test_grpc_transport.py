"""The gRPC transport without Ray: a real grpc.aio server on loopback, registered by
the same `add_servicers` Serve uses, over an ImageService on FakeEngine, called by
the generated client stub (tests/serve/test_grpc.py runs it through Ray Serve)."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serve.batch.jobs import BatchJobs
from serve.batch.queue import open_queue
from serve.config import ROOT
from serve.engines.base import Generated, Job
from serve.errors import (
    GenerationFailed,
    ImagegenError,
    ModelUnavailable,
    Overloaded,
    TierDisabled,
    row,
)
from serve.ingress import grpc as transport
from serve.ingress.proto import images_pb2 as pb
from serve.ingress.proto import images_pb2_grpc as pb_grpc
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.safety.policy import LivePolicy, load_policy_file
from serve.schemas import GenerateRequest, GenerateResponse
from serve.schemas import Image as Img
from serve.service import ImageService
from serve.storage.results import Results
from serve.storage.store import open_store
from serve.telemetry import Metrics

TRACE = "0af7651916cd43dd8448eb211c80319c"


class Servicer:
    """What the ingress deployment does: each RPC to the transport method."""

    def __init__(self, t: transport.GrpcTransport) -> None:
        self.Generate, self.ListModels, self.Check = t.generate, t.list_models, t.check
        self.GetQuota, self.ListTemplates = t.get_quota, t.list_templates
        self.GetImage, self.Reroll = t.get_image, t.reroll
        self.SubmitBatch, self.GetBatch, self.ListBatches = (
            t.submit_batch, t.get_batch, t.list_batches)
        self.CancelBatch, self.GetBatchResults = t.cancel_batch, t.get_batch_results


class Key(grpc.aio.UnaryUnaryClientInterceptor):
    """Sends `authorization: Bearer <key>` with every unary call, as a client would."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    async def intercept_unary_unary(self, continuation, details, request):
        if self.key:
            md = [*(details.metadata or []), ("authorization", f"Bearer {self.key}")]
            details = details._replace(metadata=grpc.aio.Metadata(*md))
        return await continuation(details, request)


def _serve(service: ImageService, body, *, key: str, ready: bool = True, metrics=None):
    """Run `body(channel)` against a server over `service`, the channel sending
    `key` with every call; its result."""

    async def readiness():
        return ready, {}

    async def main():
        server = grpc.aio.server()
        transport.add_servicers(
            Servicer(transport.GrpcTransport(service, readiness,
                                             metrics or Metrics("prometheus"))), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{port}", interceptors=[Key(key)]
            ) as channel:
                return await body(channel)
        finally:
            await server.stop(None)

    return asyncio.run(main())


@pytest.fixture
def serve(api_key):
    """_serve with the key of the `auth` fixture's store."""
    return functools.partial(_serve, key=api_key)


@pytest.fixture
def call(serve):
    return functools.partial(_call, serve)


def _call(serve, service, request, **kw):
    """(response, trailing metadata) or the RpcError."""

    metadata = kw.pop("metadata", None)

    async def body(channel):
        c = pb_grpc.ImagesStub(channel).Generate(request, timeout=10, metadata=metadata)
        try:
            return await c, dict(await c.trailing_metadata())
        except grpc.aio.AioRpcError as e:
            return e

    return serve(service, body, **kw)


def test_generate_answers_like_http(service, call):
    r, trailers = call(service, pb.GenerateRequest(prompt="a fox", n=2, seed=7),
                       metadata=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-01")])
    assert (r.tier, r.model, r.fallback, r.trace_id) == ("draft", "tiny-draft", False, TRACE)
    assert [i.seed for i in r.images] == [7, 8]
    img = Image.open(io.BytesIO(r.images[0].data))
    assert img.size == (64, 48) and r.images[0].mime_type == "image/png"
    assert trailers[transport.TRACE_KEY] == TRACE and transport.CODE_KEY not in trailers
    assert trailers[transport.ID_KEY] == r.id
    # the same request on the native route: the same images
    native = asyncio.run(service.generate(GenerateRequest(prompt="a fox", n=2, seed=7), "x"))
    assert [i.data for i in r.images] == [_png(i.b64_json) for i in native.images]


def _png(b64: str) -> bytes:
    import base64

    return base64.b64decode(b64)


@pytest.mark.parametrize(("fields", "want"), [
    ({}, {"tier": "draft", "n": 1, "size": None, "seed": None, "steps": None,
          "guidance": None, "quality": None, "negative_prompt": ""}),
    ({"n": 3, "seed": 0, "steps": 5, "guidance": 0.0}, {"n": 3, "seed": 0, "steps": 5,
                                                         "guidance": 0.0}),
    ({"tier": "final", "size": "96x64", "negative_prompt": "fog"},
     {"tier": "final", "size": "96x64", "negative_prompt": "fog"}),
    ({"quality": pb.QUALITY_HIGH}, {"quality": "high"}),
    ({"quality": pb.QUALITY_UNSPECIFIED}, {"quality": None, "model": None}),
    ({"model": "tiny-final"}, {"model": "tiny-final"}),
    ({}, {"response_format": "b64_json", "output_format": "png", "output_quality": None,
          "aspect_ratios": None, "megapixels": None, "approval_id": None}),
    ({"response_format": "url", "output_format": "webp", "output_quality": 70,
      "approval_id": "case-7"},
     {"response_format": "url", "output_format": "webp", "output_quality": 70,
      "approval_id": "case-7"}),
    ({"aspect_ratios": ["16:9", "1:1"], "megapixels": 0.25},
     {"aspect_ratios": ["16:9", "1:1"], "megapixels": 0.25, "size": None}),
])
def test_unset_fields_take_the_http_defaults(fields, want):
    got = transport.to_request(pb.GenerateRequest(prompt="a fox", **fields).SerializeToString())
    for k, v in want.items():
        assert getattr(got, k) == v, k


# (request bytes, gRPC status, stable code, text in the details)
BAD = [
    pytest.param(pb.GenerateRequest(prompt="x", n=9), "INVALID_ARGUMENT", "invalid_request", "n:",
                 id="n=9"),
    pytest.param(pb.GenerateRequest(prompt=""), "INVALID_ARGUMENT", "invalid_request", "prompt",
                 id="no-prompt"),
    pytest.param(pb.GenerateRequest(prompt="a\x00b"), "INVALID_ARGUMENT", "invalid_request",
                 "U+0000", id="NUL"),
    pytest.param(pb.GenerateRequest(prompt="x", size="\u0666\u0664x64"), "INVALID_ARGUMENT",
                 "invalid_request", "size", id="arabic-digits"),
    pytest.param(pb.GenerateRequest(prompt="x", seed=1, steps=2, quality=pb.QUALITY_LOW),
                 "INVALID_ARGUMENT", "invalid_request", "steps or quality", id="steps+quality"),
    pytest.param(pb.GenerateRequest(prompt="x").SerializeToString() + b"\x48\x07",
                 "INVALID_ARGUMENT", "invalid_request", "quality", id="unknown-enum"),
    pytest.param(pb.GenerateRequest(prompt="x", tier="nope"), "INVALID_ARGUMENT", "unknown_tier",
                 "nope", id="unknown-tier"),
    pytest.param(pb.GenerateRequest(prompt="x", size="1024x1024"), "OUT_OF_RANGE",
                 "limit_exceeded", "1024", id="too-big"),
    pytest.param(pb.GenerateRequest(prompt="x", steps=51), "OUT_OF_RANGE", "limit_exceeded",
                 "steps 51", id="too-many-steps"),
    pytest.param(pb.GenerateRequest(prompt="x", output_format="gif"), "INVALID_ARGUMENT",
                 "invalid_request", "output_format", id="gif"),
    pytest.param(pb.GenerateRequest(prompt="x", output_format="webp", output_quality=0),
                 "INVALID_ARGUMENT", "invalid_request", "output_quality", id="quality-0"),
    pytest.param(pb.GenerateRequest(prompt="x", size="64x64", aspect_ratios=["1:1"]),
                 "INVALID_ARGUMENT", "invalid_request", "size or aspect_ratios",
                 id="size+ratios"),
    pytest.param(pb.GenerateRequest(prompt="x", response_format="url"), "INVALID_ARGUMENT",
                 "invalid_request", "object store", id="url-without-store"),
    pytest.param(b"\x0a\x05ab", "INVALID_ARGUMENT", "malformed_body", "imagegen.v1.GenerateRequest",
                 id="truncated"),
    pytest.param(b"\x0a\x02\xff\xfe", "INVALID_ARGUMENT", "malformed_body", "UTF-8",
                 id="bad-utf8"),
    pytest.param(pb.GenerateRequest(prompt="x").SerializeToString() + b"\x60\x07",
                 "INVALID_ARGUMENT", "malformed_body", "[12]", id="unknown-field"),
    pytest.param(pb.GenerateRequest(prompt="x" * 70_000), "INVALID_ARGUMENT",
                 "payload_too_large", "exceeds 65536", id="too-large"),
]


@pytest.mark.parametrize(("request_", "status", "code", "text"), BAD)
def test_bad_input_gets_its_status_and_code(service, serve, request_, status, code, text):
    raw = request_ if isinstance(request_, bytes) else request_.SerializeToString()

    async def body(channel):
        c = channel.unary_unary(f"/{transport.SERVICE}/Generate")(raw, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c
        return info.value

    e = serve(service, body)
    assert e.code() == grpc.StatusCode[status], e.details()
    trailers = dict(e.trailing_metadata())
    assert trailers[transport.CODE_KEY] == code and text in e.details()
    assert "Traceback" not in e.details()
    if code == "invalid_request":
        assert '"field"' in trailers[transport.DETAILS_KEY]


class Failing:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def generate(self, model: str, jobs: list[Job]) -> Generated:
        raise self.exc


@pytest.mark.parametrize("exc", [
    ModelUnavailable("model tiny-draft is unavailable"), Overloaded("at capacity"),
    ModelUnavailable("replica died: " + "x" * 9000),
    GenerationFailed("model tiny-draft failed: RuntimeError"), TierDisabled("maintenance"),
    RuntimeError("a bug with a secret in it"),
], ids=lambda e: type(e).__name__)
def test_backend_failures_map_through_the_one_table(lock, routing, auth, call, exc):
    svc = ImageService(lock, LiveRouting(routing, lock, "file test"), Failing(exc), auth=auth)
    e = call(svc, pb.GenerateRequest(prompt="x"))
    err = exc if isinstance(exc, ImagegenError) else ImagegenError("x")
    assert e.code() == grpc.StatusCode[row(err).grpc]
    trailers = dict(e.trailing_metadata())
    assert trailers[transport.CODE_KEY] == err.code
    if err.retry_after_s is None:
        assert transport.RETRY_KEY not in trailers
    else:
        assert trailers[transport.RETRY_KEY] == str(err.retry_after_s)
    if not isinstance(exc, ImagegenError):  # never the exception's text, never a traceback
        assert e.details() == "internal error; see server logs"
    assert len(e.details()) <= 1024  # trailers stay within gRPC's 8 KiB metadata limit


class Slow:
    """A model call that takes `seconds` and notes whether it was cancelled."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.cancelled = asyncio.Event()

    async def generate(self, model: str, jobs: list[Job]) -> Generated:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("not cancelled")


def test_a_client_deadline_cancels_the_request_and_is_counted_cancelled(lock, routing, metrics,
                                                                        auth, serve):
    slow = Slow(10)
    svc = ImageService(lock, LiveRouting(routing, lock, "file test"), slow, auth=auth)

    async def body(channel):
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.ImagesStub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=0.3)
        await asyncio.wait_for(slow.cancelled.wait(), 2)  # the server's work stopped too
        return info.value, time.monotonic() - t0

    e, took = serve(svc, body, metrics=metrics)
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 2
    assert metrics.registry.get_sample_value("imagegen_requests_total", {
        "tier": "draft", "model": "tiny-draft", "revision": lock.get("tiny-draft").revision,
        "outcome": "cancelled", "code": "client_closed", "transport": "grpc"}) == 1


def test_a_client_cancel_stops_the_server_side(lock, routing, auth, serve):
    slow = Slow(10)
    svc = ImageService(lock, LiveRouting(routing, lock, "file test"), slow, auth=auth)

    async def body(channel):
        c = pb_grpc.ImagesStub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=10)
        await asyncio.sleep(0.2)
        c.cancel()
        await asyncio.wait_for(slow.cancelled.wait(), 2)
        return c.cancelled()

    assert serve(svc, body)


def test_list_models_matches_the_service(service, serve):
    async def body(channel):
        return await pb_grpc.ImagesStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)

    got = {m.name: m for m in serve(service, body).models}
    for info in service.models():
        m = got[info.name]
        assert (m.revision, list(m.tiers), m.limits.max_width, m.defaults.guidance) == (
            info.revision, info.tiers, info.limits.max_width, info.defaults.guidance)


def test_to_proto_carries_ids_ratios_urls_and_cached():
    link = "/v1/files/objects/ab/ab.webp?expires=1&sig=00"
    r = transport.to_proto(GenerateResponse(
        id="r1", trace_id="", created=1, tier="draft", model="tiny-draft", revision="x",
        batch_images=1, cost_units=0.0, cached=True, timings={
            "queue_ms": 0, "generate_ms": 0, "total_ms": 1},
        images=[Img(id="img_" + "a" * 24, seed=3, width=64, height=48, aspect_ratio="4:3",
                    mime_type="image/webp", url=link),
                Img(seed=4, width=64, height=48, b64_json="iVBO")]))
    url, b64 = r.images
    assert r.cached and (url.id, url.aspect_ratio, url.mime_type) == (
        "img_" + "a" * 24, "4:3", "image/webp")
    assert url.url == link and url.data == b""  # a path stays relative: the HTTP port's
    assert (b64.id, b64.aspect_ratio, b64.url, b64.data) == ("", "", "", b"\x89\x50\x4e")


@pytest.fixture
def stored(lock, routing, backend, auth, tmp_path) -> ImageService:
    """The service keeping its images in a local store (ids, urls, GetImage, Reroll)."""
    results = Results(open_store(f"file://{tmp_path / 'store'}"), b"test-secret")
    return ImageService(lock, LiveRouting(routing, lock, "file test"), backend, auth=auth,
                        results=results)


def test_get_image_and_reroll_answer_like_http(stored, serve, metrics):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        r = await stub.Generate(pb.GenerateRequest(
            prompt="a fox", seed=3, response_format="url", output_format="webp",
            approval_id="case-7"), timeout=10)
        got = await stub.GetImage(pb.ImageRef(id=r.images[0].id), timeout=10)
        again = await stub.Reroll(pb.RerollRequest(id=r.images[0].id, seed=3), timeout=10)
        other = await stub.Reroll(pb.RerollRequest(id=r.images[0].id, seed=9), timeout=10)
        return r, got, again, other

    r, got, again, other = serve(stored, body, metrics=metrics)
    first = r.images[0]
    assert first.id.startswith("img_") and first.data == b"" and not r.cached
    assert first.url.startswith("/v1/files/") and first.mime_type == "image/webp"
    assert (got.id, got.request_id, got.seed, got.width, got.height) == (
        first.id, r.id, 3, 64, 48)
    assert (got.mime_type, got.approval_id, got.tier, got.model, got.revision) == (
        "image/webp", "case-7", "draft", "tiny-draft", r.revision)
    assert got.url.startswith("/v1/files/") and got.expires == "" and got.safety.action
    assert got.created.startswith("20") and "T" in got.created
    recipe = json.loads(got.recipe_json)
    assert (recipe["seed"], recipe["output_format"], recipe["prompt"]) == (3, "webp", "a fox")
    # the same seed is the same recipe: answered from the store; another seed generates
    assert again.cached and [i.seed for i in again.images] == [3]
    assert not other.cached and [i.seed for i in other.images] == [9]
    assert other.images[0].id not in (first.id, again.images[0].id)
    # Generate and Reroll count as generations on grpc; GetImage does not
    assert metrics.registry.get_sample_value("imagegen_requests_total", {
        "tier": "draft", "model": "tiny-draft", "revision": r.revision, "outcome": "ok",
        "code": "ok", "transport": "grpc"}) == 3


@pytest.mark.parametrize(("rpc", "message"), [
    ("GetImage", pb.ImageRef(id="img_" + "0" * 24)),
    ("GetImage", pb.ImageRef(id="../secrets")),
    ("Reroll", pb.RerollRequest(id="img_" + "0" * 24, seed=1)),
])
def test_an_unknown_image_is_not_found(stored, serve, rpc, message):
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(pb_grpc.ImagesStub(channel), rpc)(message, timeout=10)
        return info.value

    e = serve(stored, body)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    trailers = dict(e.trailing_metadata())
    assert trailers[transport.CODE_KEY] == "not_found" and '"id"' in trailers[
        transport.DETAILS_KEY]


def test_get_image_without_a_store_is_not_found_and_a_bad_message_malformed(service, serve):
    async def body(channel):
        out = []
        for raw in (pb.ImageRef(id="img_" + "0" * 24).SerializeToString(), b"\x0a\x05ab"):
            c = channel.unary_unary(f"/{transport.SERVICE}/GetImage")(raw, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c
            out.append((info.value.code(), dict(info.value.trailing_metadata())[
                transport.CODE_KEY]))
        return out

    assert serve(service, body) == [(grpc.StatusCode.NOT_FOUND, "not_found"),
                                    (grpc.StatusCode.INVALID_ARGUMENT, "malformed_body")]


@pytest.mark.parametrize(("ready", "name", "want"), [
    (True, "", "SERVING"), (False, "", "NOT_SERVING"),
    (True, "imagegen.v1.Images", "SERVING"), (False, "imagegen.v1.Images", "NOT_SERVING"),
])
def test_health_follows_readiness(service, serve, ready, name, want):
    async def body(channel):
        return await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5)

    got = serve(service, body, ready=ready)
    assert health_pb2.HealthCheckResponse.ServingStatus.Name(got.status) == want


def test_health_of_an_unknown_service_is_not_found_and_watch_is_unimplemented(service, serve):
    async def body(channel):
        stub = health_pb2_grpc.HealthStub(channel)
        out = []
        for rpc in (lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5),
                    lambda: stub.Watch(health_pb2.HealthCheckRequest(), timeout=5).read()):
            try:
                await rpc()
            except grpc.aio.AioRpcError as e:
                out.append(e.code())
        return out

    assert serve(service, body) == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED]


def test_method_names_are_unique_across_services_and_match_the_proto():
    # Serve dispatches a call by its method name alone (the ingress method of that name).
    names = [m for methods in transport._METHODS.values() for m in methods]
    assert len(names) == len(set(names))
    assert set(transport._METHODS[transport.SERVICE]) == set(
        pb.DESCRIPTOR.services_by_name["Images"].methods_by_name)
    from serve.deployments.ingress import Ingress

    assert all(callable(getattr(Ingress.func_or_class, m)) for m in names)


def test_the_committed_stubs_are_what_the_pinned_grpcio_tools_generate():
    run = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(("key", "says"), [
    (None, "missing API key"), ("ig_aaaaaaaaaaaa_" + "b" * 27, "invalid or revoked"),
])
def test_no_key_or_a_bad_one_is_unauthenticated(service, key, says):
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.ImagesStub(channel).Generate(pb.GenerateRequest(prompt="x"), timeout=5)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)  # health stays open
        return info.value, health.status

    e, health = _serve(service, body, key=key)
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and says in e.details()
    assert dict(e.trailing_metadata())[transport.CODE_KEY] == "unauthenticated"
    assert health == health_pb2.HealthCheckResponse.SERVING


# Batch jobs (README § Batch jobs): the same service calls as the HTTP routes.


def test_a_batch_request_carries_what_the_http_body_would():
    items = [pb.GenerateRequest(prompt="a fox", n=2, seed=0, quality=pb.QUALITY_LOW),
             pb.GenerateRequest(prompt="a heron", guidance=0.0, aspect_ratios=["1:1"])]
    body = transport.to_batch(pb.SubmitBatchRequest(requests=items).SerializeToString())
    # unset optional fields absent: the batch's defaults and each request's, as on HTTP
    assert (body.id, body.completion_window_s, body.webhook_url) == (None, 86400, None)
    assert body.requests == [{"prompt": "a fox", "n": 2, "seed": 0, "quality": "low"},
                             {"prompt": "a heron", "guidance": 0.0, "aspect_ratios": ["1:1"]}]
    for item, fields in zip(items, body.requests, strict=True):  # what Generate would run
        assert GenerateRequest.model_validate(fields) == transport.to_request(
            item.SerializeToString())
    body = transport.to_batch(pb.SubmitBatchRequest(
        id="night_7", requests=items[:1], completion_window_s=600,
        webhook_url="https://hooks.example.com/b").SerializeToString())
    assert (body.id, body.completion_window_s, body.webhook_url) == (
        "night_7", 600, "https://hooks.example.com/b")


@pytest.mark.parametrize(("raw", "code", "text"), [
    (pb.SubmitBatchRequest(), "invalid_request", "requests"),
    (pb.SubmitBatchRequest(requests=[pb.GenerateRequest(prompt="x")],
                           completion_window_s=59), "invalid_request", "completion_window_s"),
    (pb.SubmitBatchRequest(requests=[pb.GenerateRequest(prompt="x")],
                           id="has-a-dash"), "invalid_request", "id"),
    (b"\x12\x05" + pb.GenerateRequest(prompt="x").SerializeToString() + b"\x60\x07",
     "malformed_body", "requests[0] has fields this server does not know: [12]"),
    (pb.SubmitBatchRequest(requests=[pb.GenerateRequest(prompt="x")]).SerializeToString()
     + b"\x60\x07", "malformed_body", "request has fields this server does not know: [12]"),
])
def test_a_bad_batch_message_is_refused_before_the_service(raw, code, text):
    raw = raw if isinstance(raw, bytes) else raw.SerializeToString()
    with pytest.raises(ImagegenError) as e:
        transport.to_batch(raw)
    assert e.value.code == code and text in e.value.message + json.dumps(e.value.details)


@pytest.fixture
def batched(lock, routing, backend, auth, tmp_path) -> ImageService:
    """A service keeping images, with the prompt policy and batch jobs (no worker:
    a test runs an item itself, as the worker would)."""
    url = f"sqlite://{tmp_path / 'state.db'}"
    s = ImageService(lock, LiveRouting(routing, lock, "file test"), backend, auth=auth,
                     results=Results(open_store(f"file://{tmp_path / 'store'}"), b"secret"),
                     policy=LivePolicy(load_policy_file(
                         ROOT / "serve" / "safety" / "prompt_policy.yaml")))
    s.batches = BatchJobs(open_queue(url), s.preflight, max_items=50)
    return s


def _fields(b: pb.Batch) -> dict:
    got = {f.name: getattr(b, f.name) for f in pb.Batch.DESCRIPTOR.fields}
    return {**got, "counts": dict(b.counts)}


async def _run_one(s: ImageService) -> None:
    """What a worker does with the next item: run it as its owner's request."""
    [item] = await s.batches.queue.claim("w", 30, 1)
    owner = (await s.batches.queue.get(item.batch_id)).principal
    assert await s.batches.queue.complete(item.id, item.lease_owner,
                                          await s.run_item(item, owner))


def test_a_batch_is_submitted_listed_run_and_read_like_http(batched, serve):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        b = await stub.SubmitBatch(pb.SubmitBatchRequest(id="night_1", requests=[
            pb.GenerateRequest(prompt="a fox", n=2, seed=5),
            pb.GenerateRequest(prompt="a heron", output_format="webp")]), timeout=10)
        await _run_one(batched)
        return (b, await stub.GetBatch(pb.BatchRef(id="night_1"), timeout=10),
                await stub.ListBatches(pb.ListBatchesRequest(), timeout=10),
                await stub.GetBatchResults(pb.BatchRef(id="night_1"), timeout=10))

    b, got, listed, results = serve(batched, body)
    assert (b.id, b.state, b.counts["pending"], b.progress, b.late) == (
        "night_1", "running", 2, 0.0, False)
    assert b.deadline == pytest.approx(b.created + 86400) and b.webhook_url == ""
    assert (got.counts["succeeded"], got.counts["pending"], got.progress) == (1, 1, 0.5)
    assert [x.id for x in listed.batches] == ["night_1"]
    done, waiting = results.items
    assert (done.index, done.state, done.attempts, done.error) == (0, "succeeded", 0, "")
    assert list(done.result.seeds) == [5, 6] and len(done.result.image_ids) == 2
    assert (done.result.model, done.result.withheld) == ("tiny-draft", 0)
    assert done.result.cost_units > 0 and not done.result.cached
    assert (waiting.index, waiting.state) == (1, "pending") and not waiting.HasField("result")
    # every key of the recorded result reaches the message (a new one must be mapped)
    tester = Principal(name="tester", roles=frozenset({"user"}), plan="default")
    assert _fields(got) == _fields(transport.batch_proto(asyncio.run(batched.batch(
        tester, "night_1")))) and got.manifest == ""  # still running: no manifest yet
    [http] = [i for i in asyncio.run(batched.batch_results(tester, "night_1")) if i.result]
    assert set(http.result) == {"images", "seeds", "revision", "model", "cost_units",
                                "cached", "withheld"}
    assert list(done.result.image_ids) == http.result["images"]
    assert done.result.revision == http.result["revision"]


def test_an_item_of_a_batch_is_an_image_its_owner_can_get(batched, serve):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        await stub.SubmitBatch(pb.SubmitBatchRequest(id="night_2", requests=[
            pb.GenerateRequest(prompt="a kettle", seed=9)]), timeout=10)
        await _run_one(batched)
        [item] = (await stub.GetBatchResults(pb.BatchRef(id="night_2"), timeout=10)).items
        return item, await stub.GetImage(pb.ImageRef(id=item.result.image_ids[0]), timeout=10)

    item, image = serve(batched, body)
    assert (image.seed, image.request_id) == (9, "night_2-000000")
    assert image.revision == item.result.revision


@pytest.mark.parametrize(("bad", "status", "code", "field"), [
    (pb.GenerateRequest(prompt="a n.u.d.e figure"), "PERMISSION_DENIED", "prompt_blocked",
     "requests.1.prompt"),
    (pb.GenerateRequest(prompt="x", n=9), "INVALID_ARGUMENT", "invalid_request", "requests.1.n"),
    (pb.GenerateRequest(prompt="x", size="1024x1024"), "OUT_OF_RANGE", "limit_exceeded",
     "requests.1.size"),
], ids=["blocked", "invalid", "limit"])
def test_a_bad_item_refuses_the_batch_naming_it(batched, serve, bad, status, code, field):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SubmitBatch(pb.SubmitBatchRequest(requests=[
                pb.GenerateRequest(prompt="a fox"), bad]), timeout=10)
        return info.value, await stub.ListBatches(pb.ListBatchesRequest(), timeout=10)

    e, listed = serve(batched, body)
    trailers = dict(e.trailing_metadata())
    assert e.code() == grpc.StatusCode[status] and trailers[transport.CODE_KEY] == code
    assert "requests[1]" in e.details()
    assert json.loads(trailers[transport.DETAILS_KEY])[0]["field"] == field
    assert not listed.batches  # nothing was queued


def test_a_batch_message_may_be_larger_than_one_request(batched, serve):
    # 40 long prompts: over max_body_bytes (64 KiB), within a batch's 32 times that
    requests = [pb.GenerateRequest(prompt=f"{i} " + "a fox " * 330) for i in range(40)]
    assert len(pb.SubmitBatchRequest(requests=requests).SerializeToString()) > 64 << 10

    async def body(channel):
        return await pb_grpc.ImagesStub(channel).SubmitBatch(
            pb.SubmitBatchRequest(requests=requests), timeout=10)

    assert serve(batched, body).counts["pending"] == 40


def test_cancel_and_unknown_or_others_batches(batched, serve, keys):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        await stub.SubmitBatch(pb.SubmitBatchRequest(id="night_3", requests=[
            pb.GenerateRequest(prompt=f"a lantern {i}") for i in range(3)]), timeout=10)
        cancelled = await stub.CancelBatch(pb.BatchRef(id="night_3"), timeout=10)
        codes = []
        for rpc in ("GetBatch", "CancelBatch", "GetBatchResults"):
            for ref in ("nope_1", "a/../b"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await getattr(stub, rpc)(pb.BatchRef(id=ref), timeout=10)
                codes.append((info.value.code(), dict(info.value.trailing_metadata())[
                    transport.CODE_KEY]))
        return cancelled, codes

    cancelled, codes = serve(batched, body)
    assert (cancelled.state, cancelled.counts["cancelled"], cancelled.progress) == (
        "cancelled", 3, 1.0)
    assert cancelled.manifest == ""  # ended, but this service stores no results: none
    assert codes == [(grpc.StatusCode.NOT_FOUND, "not_found")] * 6
    # another principal's key: the batch is not theirs, so it does not exist for them
    other = _other_key(keys[0])

    async def theirs(channel):
        stub = pb_grpc.ImagesStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetBatch(pb.BatchRef(id="night_3"), timeout=10)
        return info.value.code(), await stub.ListBatches(pb.ListBatchesRequest(), timeout=10)

    code, listed = _serve(batched, theirs, key=other)
    assert code == grpc.StatusCode.NOT_FOUND and not listed.batches


def _other_key(auth) -> str:
    from serve.quotas.principals import new_key, record_for

    key_id, key = new_key()
    asyncio.run(auth.store.add(record_for(key, key_id, "someone-else")))
    return key


def test_without_batch_jobs_every_batch_rpc_is_not_found(service, serve):
    async def body(channel):
        stub = pb_grpc.ImagesStub(channel)
        out = []
        for rpc, message in [("SubmitBatch", pb.SubmitBatchRequest(requests=[
                pb.GenerateRequest(prompt="x")])), ("ListBatches", pb.ListBatchesRequest()),
                ("GetBatch", pb.BatchRef(id="b_1"))]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await getattr(stub, rpc)(message, timeout=10)
            out.append((info.value.code(), "no batch jobs" in info.value.details()))
        return out

    assert serve(service, body) == [(grpc.StatusCode.NOT_FOUND, True)] * 3
