"""One real local Ray Serve stack per test session (about 20 s and 1.5 GB).

The stack serves the real models.lock tiny pipelines through the diffusers engine,
plus a `broken` revision whose files fail verification, routed by its own tier,
to show that one bad revision is reported and contained.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from serve.config import ROOT, load_settings

BROKEN = """
[models.broken]
source = {{ kind = "path", path = "broken" }}
pipeline = "StableDiffusionPipeline"
dtype = "float32"
license = "Apache-2.0"
commercial_use = "allowed"
vram_gb = 0
defaults = {{ width = 64, height = 64, steps = 2, guidance = 5.0 }}
limits = {{ max_width = 128, max_height = 128, max_steps = 8 }}
files = {{ "model_index.json" = "{sha}" }}
"""
PLANS = """
plans:
  default: {tiers: [draft, final, broken], bucket: {burst: 100000, refill_per_s: 1000}}
  drafts-only: {tiers: [draft], max_n: 2}
  ten-drafts:  # ten 64x64 drafts' worth, refilled only after minutes
    tiers: [draft]
    bucket: {burst: 0.04096, refill_per_s: 0.0001}
"""
ROUTING = """
tiers:
  draft: {model: tiny-draft}
  final: {model: tiny-final}
  broken: {model: broken}
"""


# Service ports come from below the kernel's ephemeral range (32768+ here): a port
# handed out by bind(0) is one an outgoing connection (Ray's, a client's) may take
# next, so a service told to listen there could find it taken. Above Ray's worker
# port range (10002-19999) too.
_SERVICE_PORTS = range(20000, 32760)
_taken: set[int] = set()


def _free_port() -> int:
    import random

    while True:
        port = random.choice(_SERVICE_PORTS)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)  # never twice in one session, even once it is free again
        return port


def service_ports() -> dict[str, int]:
    """Free `port`, `grpc_port` and `metrics_port` for a local service (its Serve
    proxies take port + 8 and grpc_port + 8: those must be free too)."""
    from serve.local import DIRECT_INGRESS_PORTS

    port = _proxied_port()
    while abs((grpc := _proxied_port()) - port) <= DIRECT_INGRESS_PORTS:
        pass  # the two direct-ingress ranges must not overlap
    return {"port": port, "grpc_port": grpc, "metrics_port": _free_port()}


def _proxied_port() -> int:
    from serve.local import DIRECT_INGRESS_PORTS

    while True:
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + DIRECT_INGRESS_PORTS))
            except OSError:
                continue
        return port


class SpanStore:
    """In-memory spans received over OTLP/HTTP from every Serve process (the real
    exporter path, configured by the standard OTEL_* variables)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()

    def add(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest.FromString(body)
        with self._lock:
            for rs in req.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append({
                            "name": sp.name, "trace_id": sp.trace_id.hex(),
                            "span_id": sp.span_id.hex(),
                            "parent_span_id": sp.parent_span_id.hex(), "kind": sp.kind,
                            "attributes": {a.key: _any(a.value) for a in sp.attributes},
                            "resource": resource,
                        })

    def trace(self, trace_id: str, names: set[str], deadline_s: float = 20) -> list[dict]:
        """The trace's spans once every name in `names` has arrived."""
        end = time.monotonic() + deadline_s
        while True:
            with self._lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if names <= {s["name"] for s in found} or time.monotonic() > end:
                return found
            time.sleep(0.2)


def _any(v):
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture(scope="session")
def otlp():
    """An OTLP/HTTP receiver on loopback that keeps spans in memory."""
    store = SpanStore()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces":
                store.add(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store.endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    yield store
    server.shutdown()


def _loopback_only() -> None:
    if os.environ.get("LOOPBACK_NS") != "1":
        pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")


@pytest.fixture(scope="session")
def served_models(tmp_path_factory) -> tuple[Path, Path]:
    """(models.lock, model_dir): the real lock plus a `broken` revision whose file
    fails verification; the builtin tiny models built once per session."""
    from serve.tinymodels import build_missing

    tmp = tmp_path_factory.mktemp("models")
    models = tmp / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "model_index.json").write_text("{}\n")
    wrong = hashlib.sha256(b"what the lock expected").hexdigest()
    lock = tmp / "models.lock"
    lock.write_text((ROOT / "models.lock").read_text() + BROKEN.format(sha=wrong))
    build_missing(lock, models)  # the builtin tiny models; `broken` is a path source
    return lock, models


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    plans = tmp / "plans.yaml"  # the stack's tiers, `broken` included, and a drafts-only plan
    plans.write_text(PLANS)
    policy = tmp / "prompt_policy.yaml"  # the package's, in a file a test may change
    policy.write_text((ROOT / "serve" / "safety" / "prompt_policy.yaml").read_text())
    return {**service_ports(), "state_url": f"sqlite://{tmp / 'state.db'}",
            "storage_url": f"file://{tmp / 'images'}",
            "plans_file": str(plans), "prompt_policy_file": str(policy)}


@pytest.fixture(scope="session")
def api_key(stack_settings) -> str:
    """A key in the stack's state store (principal `tester`), as `imagegen keys create`
    makes one."""
    import asyncio

    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    async def make() -> str:
        store = open_keys(stack_settings["state_url"])
        key_id, key = new_key()
        await store.add(record_for(key, key_id, "tester", ("user", "admin")))
        await store.close()
        return key

    return asyncio.run(make())


@pytest.fixture(scope="session")
def auth_headers(api_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory, otlp, stack_settings, served_models, api_key):
    """Base URL of a running stack; torn down at the end of the session."""
    _loopback_only()
    from serve import local

    lock, models = served_models
    routing = tmp_path_factory.mktemp("stack") / "routing.yaml"
    routing.write_text(ROUTING)
    settings = load_settings(
        lock_file=lock, routing_file=routing, model_dir=models, threads=1,
        # a gateway on loopback may name the caller (test_quota_stack.py)
        trusted_proxies=["127.0.0.1/32"], identity_plan="drafts-only", **stack_settings,
    )
    # Ray's workers inherit the environment Ray starts with; this test process
    # keeps its own (its unit-test spans must not go to the receiver).
    telemetry_env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: export soon after a request
        "RAY_metrics_report_interval_ms": "1000",
    }
    saved = {k: os.environ.get(k) for k in telemetry_env}
    os.environ.update(telemetry_env)
    try:
        url = local.start(settings, num_cpus=2)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        _wait_ready(url, ("tiny-draft", "tiny-final"))
        yield url
    finally:
        local.stop()


def _wait_ready(url: str, models: tuple[str, ...], deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            body = httpx.get(f"{url}/readyz", timeout=5).json()
            if all(body["models"][m]["ready"] for m in models):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"models {models} not ready at {url} within {deadline_s} s")


@pytest.fixture
def client(stack, auth_headers):
    with httpx.Client(base_url=stack, timeout=60, headers=auth_headers) as c:
        yield c


@pytest.fixture(scope="session")
def lock_entries():
    from serve.lockfile import load_lock

    return load_lock(Path(ROOT / "models.lock")).models


@pytest.fixture
def free_ports() -> dict[str, int]:
    return service_ports()


@pytest.fixture(scope="session")
def new_ports():
    """service_ports itself, for fixtures wider than one test."""
    return service_ports
