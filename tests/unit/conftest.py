"""Shared builders for tests/unit: lock TOML text, a parsed lock, routing, and an
ImageService over FakeEngine. No Ray: the backend calls the engine in-process."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from typing import Any

import pytest

from serve.engines.base import EngineSpec, Generated, Job
from serve.engines.fake import FakeEngine
from serve.lockfile import Lock, parse_lock
from serve.quotas.auth import Authenticator
from serve.quotas.keys import open_keys
from serve.quotas.principals import new_key, record_for
from serve.routing import LiveRouting, RoutingTable, parse_routing
from serve.service import ImageService
from serve.telemetry import Metrics

SHA_A = "a" * 64
SHA_B = "b" * 64
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Two models with different defaults and limits so a test can tell which one
# served a request. tiny-draft is a path source (content revision), tiny-final a
# hub source (commit revision).
ENTRIES: dict[str, dict[str, Any]] = {
    "tiny-draft": {
        "source": {"kind": "path", "path": "tiny-draft"},
        "pipeline": "StableDiffusionPipeline",
        "dtype": "float32",
        "license": "MIT",
        "commercial_use": "allowed",
        "vram_gb": 0.5,
        "defaults": {"width": 64, "height": 48, "steps": 4, "guidance": 7.5},
        "limits": {"min_size": 32, "max_width": 256, "max_height": 128, "max_steps": 50,
                   "max_guidance": 20.0, "max_images": 4},
        "files": {"model_index.json": SHA_A, "unet/diffusion_pytorch_model.safetensors": SHA_B},
    },
    "tiny-final": {
        "source": {"kind": "hub", "repo": "acme/tiny-final", "revision": HUB_COMMIT},
        "pipeline": "StableDiffusionXLPipeline",
        "dtype": "float16",
        "license": "openrail++",
        "commercial_use": "restricted",
        "vram_gb": 2.0,
        "defaults": {"width": 96, "height": 96, "steps": 8, "guidance": 5.0},
        "limits": {"min_size": 64, "max_width": 512, "max_height": 512, "max_steps": 100,
                   "max_guidance": 10.0, "max_images": 8},
        "files": {"model_index.json": SHA_B},
    },
}
ROUTES = {"tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def render_lock(models: dict[str, dict[str, Any]], version: Any = 1) -> str:
    """models.lock text: `version` (omitted when None) and one table per model."""
    lines = [] if version is None else [f"version = {_value(version)}"]
    for name, entry in models.items():
        lines.append(f"\n[models.{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def entries(patch: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Deep copy of ENTRIES with per-model top-level keys replaced."""
    out = copy.deepcopy(ENTRIES)
    for name, fields in (patch or {}).items():
        out.setdefault(name, {}).update(fields)
    return out


class FakeBackend:
    """Runs one FakeEngine per model, in-process (what a model deployment does)."""

    def __init__(self, lock: Lock) -> None:
        self.engines = {}
        for e in lock.models.values():
            engine = FakeEngine(EngineSpec(e.name, e.revision, None, e.pipeline, e.dtype, {}))
            engine.load()
            self.engines[e.name] = engine
        self.calls: list[tuple[str, list[Job]]] = []

    async def generate(self, model: str, jobs: list[Job]) -> Generated:
        self.calls.append((model, jobs))
        t0 = time.perf_counter()
        images = self.engines[model].generate(jobs)
        return Generated(images, queue_s=0.0, generate_s=time.perf_counter() - t0,
                         batch_images=len(jobs))


# Helpers reach tests as fixtures: tests/unit is not a package, so importing
# conftest by name would depend on pytest's import mode.
@pytest.fixture
def lock_text():
    """Factory: lock TOML of ENTRIES, per-model fields patched, `version` settable."""

    def make(patch: dict[str, dict[str, Any]] | None = None, *, version: Any = 1) -> str:
        return render_lock(entries(patch), version=version)

    return make


@pytest.fixture
def toml_lock():
    """render_lock itself, for a lock built from scratch."""
    return render_lock


@pytest.fixture
def entry_dicts():
    """Factory: a deep copy of ENTRIES (model name -> lock table as a dict), patched."""
    return entries


@pytest.fixture
def lock() -> Lock:
    return parse_lock(render_lock(ENTRIES))


@pytest.fixture
def routing(lock: Lock) -> RoutingTable:
    return parse_routing(ROUTES, lock)


@pytest.fixture
def backend(lock: Lock) -> FakeBackend:
    return FakeBackend(lock)


@pytest.fixture
def backend_for():
    """FakeBackend itself, for a test's own lock."""
    return FakeBackend


@pytest.fixture
def state(tmp_path, monkeypatch) -> str:
    """A fresh SQLite state store, and the settings (IMAGEGEN_STATE_URL) pointing at it:
    the CLI tests' operator commands use it."""
    url = f"sqlite://{tmp_path / 'state.db'}"
    monkeypatch.setenv("IMAGEGEN_STATE_URL", url)
    return url


@pytest.fixture
def keys(tmp_path) -> tuple[Authenticator, str]:
    """A real authenticator over a SQLite state store holding one key, and the key."""
    store = open_keys(f"sqlite://{tmp_path / 'state.db'}")
    key_id, key = new_key()
    asyncio.run(store.add(record_for(key, key_id, "tester")))
    return Authenticator(store), key


@pytest.fixture
def auth(keys) -> Authenticator:
    return keys[0]


@pytest.fixture
def api_key(keys) -> str:
    return keys[1]


@pytest.fixture
def service(lock: Lock, routing: RoutingTable, backend: FakeBackend, auth) -> ImageService:
    return ImageService(lock, LiveRouting(routing, lock, "file test"), backend, auth=auth)


@pytest.fixture
def metrics() -> Metrics:
    """A prometheus_client registry of the catalogue, fresh per test."""
    return Metrics("prometheus")


@pytest.fixture(scope="session")
def _span_memory():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serve.telemetry.tracing import add_span_processor

    exporter = InMemorySpanExporter()
    add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_span_memory):
    """The SDK's in-memory exporter, emptied before each test."""
    _span_memory.clear()
    return _span_memory


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def state_url(request, tmp_path):
    """A fresh state store on each backend: a SQLite file, the session's real
    redis-server, or its real three-node Redis Cluster (tests/conftest.py), emptied."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'state.db'}"
    server = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster")
    server.flush()
    return server.url


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # fake credentials, and nothing of this machine's AWS setup (profiles, endpoints)
        none = str(tmp_path_factory.mktemp("aws") / "none")
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": none,
                            "AWS_SHARED_CREDENTIALS_FILE": none,
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        from moto_s3 import MotoS3

        s3 = MotoS3()
        try:
            yield s3
        finally:
            s3.close()
