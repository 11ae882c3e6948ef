"""A stopping ingress replica (tests/serve/test_drain.py runs it through Ray Serve):
the Drain flag read from the replica, new requests refused 503 `draining` with
Retry-After on HTTP, the OpenAI route and gRPC, the probes, and the deployment
options that give the requests in flight their grace."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.deployments.ingress import Drain
from serve.errors import Draining, row
from serve.ingress import grpc as transport
from serve.ingress.http import build_http_app
from serve.ingress.proto import images_pb2 as pb
from serve.ingress.proto import images_pb2_grpc as pb_grpc
from serve.telemetry import Metrics


class Replica:
    """Stands in for Serve's replica: the one flag Drain reads."""

    _shutting_down = False


class Switch:
    """A `draining` callable a test flips."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self) -> bool:
        return self.on


def test_drain_follows_the_replica_flag_and_counts_down_its_grace():
    replica = Replica()
    drain = Drain(30.0, replica)
    assert not drain() and drain.since is None and drain.left_s() == 30.0
    replica._shutting_down = True
    assert drain() and drain.since is not None
    assert 29.0 < drain.left_s() <= 30.0
    replica._shutting_down = False  # once stopping, always stopping
    assert drain()


def test_outside_serve_nothing_drains():
    drain = Drain(30.0)
    assert not drain() and not drain()


def test_draining_is_a_retryable_503_unavailable():
    err = Draining("stopping")
    assert (err.code, err.retry_after_s) == ("draining", 1)
    assert row(err) == (503, "UNAVAILABLE", 503, "server_error")


@pytest.fixture
def http(service, api_key):
    draining = Switch()

    async def readiness():
        return not draining(), {"draining": draining()}

    app = build_http_app(service, readiness, max_body_bytes=4096,
                         metrics=Metrics("prometheus"), draining=draining)
    client = TestClient(app, raise_server_exceptions=False,
                        headers={"Authorization": f"Bearer {api_key}"})
    return client, draining


def test_http_refuses_new_requests_and_closes_connections_while_draining(http):
    client, draining = http
    r = client.post("/v1/images", json={"prompt": "a fox"})
    assert r.status_code == 200 and "connection" not in r.headers
    draining.on = True
    r = client.post("/v1/images", json={"prompt": "a fox"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "draining"
    assert (r.headers["retry-after"], r.headers["connection"]) == ("1", "close")
    assert r.headers["x-trace-id"]  # inside Telemetry: logged and counted like any answer
    o = client.post("/v1/images/generations", json={"prompt": "a fox"})
    assert o.status_code == 503 and o.headers["retry-after"] == "1"
    assert (o.json()["error"]["code"], o.json()["error"]["type"]) == ("draining", "server_error")
    assert client.get("/v1/models").status_code == 503


def test_http_probes_answer_while_draining(http):
    client, draining = http
    draining.on = True
    live, ready = client.get("/healthz"), client.get("/readyz")
    assert live.status_code == 200 and live.headers["connection"] == "close"
    assert ready.status_code == 503 and ready.json()["draining"] is True


class Servicer:
    """Generate and Check as the ingress routes them; the other RPCs go unused here."""

    def __init__(self, t: transport.GrpcTransport) -> None:
        for method in transport._METHODS[transport.SERVICE]:
            setattr(self, method, t.list_models)
        self.Generate, self.Check = t.generate, t.check


def _grpc(service, key: str, body, draining: bool):
    async def readiness():
        return not draining, {}

    async def main():
        t = transport.GrpcTransport(service, readiness, Metrics("prometheus"),
                                    draining=lambda: draining)
        server = grpc.aio.server()
        transport.add_servicers(Servicer(t), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(channel, [("authorization", f"Bearer {key}")])
        finally:
            await server.stop(None)

    return asyncio.run(main())


@pytest.mark.parametrize("draining", [False, True])
def test_grpc_refuses_new_calls_unavailable_with_retry_after(service, api_key, draining):
    async def body(channel, metadata):
        call = pb_grpc.ImagesStub(channel).Generate(
            pb.GenerateRequest(prompt="a fox"), timeout=10, metadata=metadata)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            return e.code(), dict(e.trailing_metadata())
        return grpc.StatusCode.OK, dict(await call.trailing_metadata())

    code, trailers = _grpc(service, api_key, body, draining)
    if not draining:
        assert code == grpc.StatusCode.OK
        return
    assert code == grpc.StatusCode.UNAVAILABLE
    assert (trailers[transport.CODE_KEY], trailers[transport.RETRY_KEY]) == ("draining", "1")


@pytest.mark.parametrize(("draining", "want"), [(False, "SERVING"), (True, "NOT_SERVING")])
def test_grpc_health_is_not_serving_while_draining(service, api_key, draining, want):
    async def body(channel, _metadata):
        return await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=transport.SERVICE), timeout=5)

    got = _grpc(service, api_key, body, draining)
    assert health_pb2.HealthCheckResponse.ServingStatus.Name(got.status) == want


def test_serve_waits_out_the_grace_before_killing_a_replica(tmp_path):
    from serve.app import DRAIN_MARGIN_S, build_app
    from serve.config import load_settings

    app = build_app(load_settings(
        state_url=f"sqlite://{tmp_path / 'state.db'}", storage_url=f"file://{tmp_path / 'img'}",
        engine="fake", image_classifier="none", request_timeout_s=42))
    ingress = app._bound_deployment
    assert ingress.init_kwargs["drain_grace_s"] == 42
    assert ingress._deployment_config.graceful_shutdown_timeout_s == 42 + DRAIN_MARGIN_S
    for model in ingress.init_args[2].values():  # the requests in flight wait on these
        cfg = model._bound_deployment._deployment_config
        assert cfg.graceful_shutdown_timeout_s == 42 + DRAIN_MARGIN_S


def test_every_deployment_carries_the_grpc_message_limit_in_its_own_environment(tmp_path):
    """The ingress calls models and the classifier by value over gRPC, whose messages
    stop at 4 MiB unless each replica's environment lifts it: every deployment's
    runtime_env does (so `serve run` or any RayService gets it), the safety one too."""
    from serve.app import build_app
    from serve.config import load_settings
    from serve.local import GRPC_LIMIT

    app = build_app(load_settings(
        state_url=f"sqlite://{tmp_path / 'state.db'}", storage_url=f"file://{tmp_path / 'img'}",
        engine="fake", image_classifier="fixed:sexual=0.01", request_timeout_s=42))
    ingress = app._bound_deployment
    deployments = [ingress, *(m._bound_deployment for m in ingress.init_args[2].values()),
                   ingress.init_args[7]._bound_deployment]
    assert len(deployments) >= 4
    for d in deployments:
        options = d.ray_actor_options
        assert options["runtime_env"]["env_vars"] == GRPC_LIMIT, d.name
        assert options["num_cpus"] > 0, d.name  # the rest of the options stay
