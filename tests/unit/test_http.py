"""HTTP transport under TestClient (in-process ASGI, no server, no Ray)."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from serve.errors import GenerationFailed, LimitExceeded, Overloaded
from serve.ingress.http import build_http_app
from serve.routing import LiveRouting
from serve.service import ImageService
from serve.telemetry import Metrics

MAX_BODY = 2048
GOOD = {"prompt": "a red fox", "seed": 3}
HEX32 = re.compile(r"^[0-9a-f]{32}$")


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.models = {"tiny-draft": "RUNNING", "tiny-final": "RUNNING"}

    async def __call__(self):
        return self.ready, {"models": dict(self.models)}


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


def make_client(service, readiness, metrics=None, key: str | None = None) -> TestClient:
    app = build_http_app(service, readiness, max_body_bytes=MAX_BODY,
                         metrics=metrics or Metrics("prometheus"))
    # The Exception handler answers 500 and then re-raises for the server to log;
    # the client must not turn that re-raise into a test error.
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return TestClient(app, raise_server_exceptions=False, headers=headers)


@pytest.fixture
def client(service, readiness, api_key) -> TestClient:
    return make_client(service, readiness, key=api_key)


def _json(body: dict) -> dict:
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def test_generate_ok(client, lock):
    r = client.post("/v1/images", json={**GOOD, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == r.headers["x-request-id"]
    assert HEX32.match(body["id"])
    assert (body["tier"], body["model"]) == ("draft", "tiny-draft")
    assert body["revision"] == lock.get("tiny-draft").revision
    assert [i["seed"] for i in body["images"]] == [3, 4]
    assert r.headers["content-type"] == "application/json"


# (method, path, request kwargs, status, code)
BAD = [
    pytest.param("post", "/v1/images", {"content": b"{", "headers":
                 {"content-type": "application/json"}}, 400, "malformed_body", id="malformed"),
    pytest.param("post", "/v1/images", {"content": json.dumps(GOOD).encode(),
                 "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type",
                 id="text-plain"),
    pytest.param("post", "/v1/images", {"content": json.dumps(GOOD).encode()}, 415,
                 "unsupported_media_type", id="no-content-type"),
    pytest.param("post", "/v1/images", {"data": {"prompt": "x"}}, 415,
                 "unsupported_media_type", id="form-body"),
    pytest.param("post", "/v1/images", _json({**GOOD, "colour": "red"}), 422,
                 "invalid_request", id="unknown-field"),
    pytest.param("post", "/v1/images", _json({**GOOD, "n": 0}), 422, "invalid_request",
                 id="n-0"),
    pytest.param("post", "/v1/images", _json({**GOOD, "tier": "gold"}), 422, "unknown_tier",
                 id="unknown-tier"),
    pytest.param("post", "/v1/images", _json({**GOOD, "size": "1024x1024"}), 422,
                 "limit_exceeded", id="size-over-limit"),
    pytest.param("post", "/v1/images", _json({**GOOD, "steps": 51}), 422, "limit_exceeded",
                 id="steps-over-limit"),
    pytest.param("post", "/v1/images", _json({**GOOD, "prompt": "x" * 2000,
                 "negative_prompt": "y" * 2000}), 413, "payload_too_large", id="too-large"),
    pytest.param("post", "/v1/images", {"content": [b"{" + b" " * MAX_BODY] * 3,
                 "headers": {"content-type": "application/json"}}, 413, "payload_too_large",
                 id="too-large-chunked"),
    pytest.param("get", "/v2/images", {}, 404, "not_found", id="unknown-path"),
    pytest.param("get", "/", {}, 404, "not_found", id="root"),
    pytest.param("delete", "/v1/images", {}, 405, "method_not_allowed", id="delete"),
    pytest.param("get", "/v1/images", {}, 405, "method_not_allowed", id="get-images"),
    pytest.param("post", "/v1/models", {}, 405, "method_not_allowed", id="post-models"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD)
def test_bad_input_gets_status_code_envelope_and_request_id(client, method, path, kwargs,
                                                            status, code):
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body["error"]) <= {"code", "message", "details", "trace_id"}
    assert HEX32.match(r.headers["x-request-id"])


def test_invalid_request_details_name_the_field(client):
    r = client.post("/v1/images", json={**GOOD, "seed": -1})
    assert r.status_code == 422
    assert [d["field"] for d in r.json()["error"]["details"]] == ["seed"]


def test_too_large_is_checked_before_the_body_is_parsed(client):
    # Malformed and oversized: the size limit answers first.
    r = client.post("/v1/images", content=b"{" * (MAX_BODY + 1),
                    headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (413, "payload_too_large")


def test_body_at_the_limit_is_accepted(client):
    body = json.dumps({**GOOD, "prompt": "x"}).encode()
    body = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
    assert len(body) == MAX_BODY
    r = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "ctype", ["application/json; charset=utf-8", "Application/JSON", " application/json "]
)
def test_content_type_parameters_and_case_are_accepted(client, ctype):
    r = client.post("/v1/images", content=json.dumps(GOOD).encode(),
                    headers={"content-type": ctype})
    assert r.status_code == 200, r.text


def test_405_names_the_allowed_methods(client):
    r = client.delete("/v1/images")
    assert r.status_code == 405
    assert "POST" in r.headers.get("allow", "")


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [("POST", "/v1/images", {"json": GOOD}, 200),
     ("POST", "/v1/images", {"json": {**GOOD, "n": 0}}, 422),
     ("GET", "/nope", {}, 404),
     ("DELETE", "/v1/images", {}, 405)],
    ids=["ok", "invalid", "404", "405"],
)
def test_well_formed_request_id_is_echoed(client, method, path, kwargs, status):
    rid = "req-42.a_b:C"
    r = client.request(method, path, headers={"x-request-id": rid}, **kwargs)
    assert r.status_code == status
    assert r.headers["x-request-id"] == rid
    if status == 200:
        assert r.json()["id"] == rid


@pytest.mark.parametrize(
    "rid", ["has space", "x" * 65, "semi;colon", "quote\"", "slash/x", ""],
    ids=["space", "65-chars", "semicolon", "quote", "slash", "empty"],
)
@pytest.mark.parametrize("good", [True, False], ids=["ok", "error"])
def test_malformed_request_id_is_replaced(client, rid, good):
    body = GOOD if good else {**GOOD, "tier": "gold"}
    r = client.post("/v1/images", json=body, headers={"x-request-id": rid})
    assert r.status_code == (200 if good else 422)
    assert r.headers["x-request-id"] != rid
    assert HEX32.match(r.headers["x-request-id"])
    if good:
        assert r.json()["id"] == r.headers["x-request-id"]


def test_request_id_at_64_chars_is_kept(client):
    rid = "a" * 64
    assert client.post("/v1/images", json=GOOD, headers={"x-request-id": rid}).headers[
        "x-request-id"] == rid


@pytest.mark.parametrize(("ready", "status"), [(True, 200), (False, 503)])
def test_readyz(client, readiness, ready, status):
    readiness.ready = ready
    readiness.models["tiny-final"] = "RUNNING" if ready else "DEPLOY_FAILED"
    r = client.get("/readyz")
    assert r.status_code == status
    assert r.json() == {"ready": ready, "models": readiness.models}


def test_healthz_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["tiny-final"]["tiers"] == ["final"]
    assert models["tiny-draft"]["limits"]["max_width"] == 256


class RaisingBackend:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def generate(self, model, jobs):
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        pytest.param(RuntimeError("boom at /srv/secret/path.py"), 500, "internal",
                     id="runtime-error"),
        pytest.param(ValueError("secret-internal-detail"), 500, "internal", id="value-error"),
        pytest.param(GenerationFailed("pipeline raised"), 500, "generation_failed",
                     id="generation-failed"),
        pytest.param(Overloaded("at capacity"), 503, "overloaded", id="overloaded"),
    ],
)
def test_backend_failures(lock, routing, readiness, auth, api_key, exc, status, code):
    svc = ImageService(lock, LiveRouting(routing, lock, "file test"), RaisingBackend(exc),
                       auth=auth)
    client = make_client(svc, readiness, key=api_key)
    r = client.post("/v1/images", json=GOOD, headers={"x-request-id": "rid-500"})
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.headers["x-request-id"] == "rid-500"
    if code == "internal":
        assert r.json() == {"error": {"code": "internal",
                                      "message": "internal error; see server logs",
                                      "trace_id": r.headers["x-trace-id"]}}
        for leak in ("Traceback", "secret", "RuntimeError", "ValueError", ".py"):
            assert leak not in r.text
    if code == "overloaded":
        assert r.headers["retry-after"] == "1"


def test_ray_style_dynamic_subclass_keeps_its_status(lock, routing, readiness, auth, api_key):
    class RayTaskError(Exception):
        pass

    dyn = type("RayTaskError(LimitExceeded)", (RayTaskError, LimitExceeded), {})
    svc = ImageService(lock, LiveRouting(routing, lock, "file test"),
                       RaisingBackend(dyn("remote")), auth=auth)
    client = make_client(svc, readiness, key=api_key)
    r = client.post("/v1/images", json=GOOD)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "limit_exceeded")


def test_good_request_still_succeeds_after_bad_ones(client):
    for p in BAD:
        method, path, kwargs, status, _ = p.values
        assert client.request(method.upper(), path, **kwargs).status_code == status, p.id
    r = client.post("/v1/images", json={**GOOD, "tier": "final", "n": 2})
    assert r.status_code == 200, r.text
    assert [i["seed"] for i in r.json()["images"]] == [3, 4]


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Basic eDp5"},
    {"Authorization": "Bearer ig_aaaaaaaaaaaa_" + "b" * 27}, {"Authorization": "Bearer \x7f"},
], ids=["none", "empty-bearer", "basic", "unknown-key", "junk"])
@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("POST", "/v1/images", {"json": GOOD}), ("GET", "/v1/models", {}),
    ("POST", "/v1/images/generations", {"json": {"prompt": "x"}}),
])
def test_a_missing_or_bad_key_is_401_on_every_api_route(service, readiness, headers, method,
                                                         path, kwargs):
    r = make_client(service, readiness).request(method, path, headers=headers, **kwargs)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="imagegen"'
    err = r.json()["error"]
    assert err["code"] == "unauthenticated"
    if path.endswith("generations"):
        assert err["type"] == "authentication_error"  # the openai client's AuthenticationError


def test_health_readiness_routing_and_docs_stay_open(service, readiness):
    c = make_client(service, readiness)
    for path in ("/healthz", "/readyz", "/v1/routing", "/docs", "/openapi.json"):
        assert c.get(path).status_code == 200, path
