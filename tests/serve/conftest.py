"""One real local Ray Serve stack per test session (about 20 s and 1.5 GB).

The stack serves the real models.lock tiny pipelines through the diffusers engine,
plus a `broken` revision whose files fail verification, routed by its own tier,
to show that one bad revision is reported and contained.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
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
ROUTING = """
tiers:
  draft: {model: tiny-draft}
  final: {model: tiny-final}
  broken: {model: broken}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Base URL of a running stack; torn down at the end of the session."""
    if os.environ.get("LOOPBACK_NS") != "1":
        pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")
    from serve import local
    from serve.models_cli import build_missing

    tmp = tmp_path_factory.mktemp("stack")
    models = tmp / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "model_index.json").write_text("{}\n")
    wrong = hashlib.sha256(b"what the lock expected").hexdigest()
    lock = tmp / "models.lock"
    lock.write_text((ROOT / "models.lock").read_text() + BROKEN.format(sha=wrong))
    routing = tmp / "routing.yaml"
    routing.write_text(ROUTING)
    settings = load_settings(
        lock_file=lock, routing_file=routing, model_dir=models, port=_free_port(), threads=1,
    )
    build_missing(settings)  # the builtin tiny models; `broken` is a path source
    url = local.start(settings, num_cpus=2)
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
def client(stack):
    with httpx.Client(base_url=stack, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def lock_entries():
    from serve.lockfile import load_lock

    return load_lock(Path(ROOT / "models.lock")).models
