"""The full path on real local Ray Serve over real HTTP: proxy -> ingress ->
per-revision model deployment -> tiny diffusers pipeline."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.serve

DRAFT = {"prompt": "a lighthouse at dusk", "tier": "draft"}


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


@pytest.mark.parametrize(
    ("tier", "model"), [("draft", "tiny-draft"), ("final", "tiny-final")]
)
def test_each_tier_answers_from_its_revision(client, lock_entries, tier, model):
    r = client.post("/v1/images", json={"prompt": "a red fox", "tier": tier, "n": 2,
                                        "size": "64x96", "seed": 41})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tier"], body["model"]) == (tier, model)
    assert body["revision"] == lock_entries[model].revision
    assert [i["seed"] for i in body["images"]] == [41, 42]
    for img in body["images"]:
        assert _png(img["b64_json"]).size == (64, 96) == (img["width"], img["height"])
    assert r.headers["x-request-id"] == body["id"]
    assert body["timings"]["generate_ms"] > 0


def test_seed_is_drawn_and_returned_when_absent(client):
    seeds = {client.post("/v1/images", json=DRAFT).json()["images"][0]["seed"] for _ in range(3)}
    assert len(seeds) == 3  # drawn, and each returned seed reproduces its image (below)


def test_same_seed_same_png_bytes(client):
    body = {**DRAFT, "seed": 1234}
    first = client.post("/v1/images", json=body).json()["images"][0]["b64_json"]
    again = client.post("/v1/images", json=body).json()["images"][0]["b64_json"]
    other = client.post("/v1/images", json={**body, "seed": 1235}).json()["images"][0]["b64_json"]
    assert first == again
    assert first != other


def test_concurrent_requests_share_batches(client, stack, auth_headers):
    def one(seed: int) -> dict:
        r = httpx.post(f"{stack}/v1/images", json={**DRAFT, "seed": seed}, timeout=120,
                       headers=auth_headers)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(one, range(32)))
    sizes = [b["batch_images"] for b in bodies]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # the policy's max_batch_images for tiny-draft
    assert sorted(b["images"][0]["seed"] for b in bodies) == list(range(32))


BAD = [
    # (body or raw bytes, content type, status, code)
    (b"{not json", "application/json", 400, "malformed_body"),
    (b'{"prompt": "x"}', "text/plain", 415, "unsupported_media_type"),
    ({"prompt": "x", "colour": "red"}, None, 422, "invalid_request"),
    ({"prompt": "x", "tier": "gold"}, None, 422, "unknown_tier"),
    ({"prompt": "x", "n": 0}, None, 422, "invalid_request"),
    ({"prompt": "x", "n": 9}, None, 422, "invalid_request"),
    ({"prompt": "x", "size": "1024x1024"}, None, 422, "limit_exceeded"),
    ({"prompt": "x", "size": "60x64"}, None, 422, "invalid_request"),
    ({"prompt": "x", "steps": 99}, None, 422, "limit_exceeded"),
    ({"prompt": "x", "steps": 0}, None, 422, "invalid_request"),
    ({"prompt": "x", "guidance": 25}, None, 422, "limit_exceeded"),
    ({"prompt": "x", "guidance": -1}, None, 422, "invalid_request"),
    ({"prompt": ""}, None, 422, "invalid_request"),
    ({"prompt": "x" * 2001}, None, 422, "invalid_request"),
    ({"n": 1}, None, 422, "invalid_request"),
    (b"x" * (70 << 10), "application/json", 413, "payload_too_large"),
]


@pytest.mark.parametrize(("body", "ctype", "status", "code"), BAD,
                         ids=[f"{s}-{c}-{i}" for i, (_, _, s, c) in enumerate(BAD)])
def test_bad_input_gets_its_envelope(client, body, ctype, status, code):
    if isinstance(body, bytes):
        r = client.post("/v1/images", content=body, headers={"content-type": ctype})
    else:
        r = client.post("/v1/images", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert set(r.json()["error"]) <= {"code", "message", "details", "trace_id"}
    assert r.json()["error"]["trace_id"] == r.headers["x-trace-id"]
    assert "Traceback" not in r.text


def test_unknown_route_and_method(client):
    assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"
    r = client.get("/v1/images")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")


def test_server_stays_healthy_after_bad_input(client):
    for body, ctype, _, _ in BAD:
        if isinstance(body, bytes):
            client.post("/v1/images", content=body, headers={"content-type": ctype})
        else:
            client.post("/v1/images", json=body)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/v1/images", json=DRAFT).status_code == 200


def test_broken_revision_is_unready_with_reason_and_contained(client):
    r = client.get("/readyz")
    assert r.status_code == 503  # a routed revision is not ready
    models = r.json()["models"]
    assert models["broken"]["ready"] is False
    assert "model_index.json" in models["broken"]["reason"]
    assert "sha256 mismatch" in models["broken"]["reason"]
    assert all(models[m]["ready"] for m in ("tiny-draft", "tiny-final", "tiny-spare"))
    r = client.post("/v1/images", json={"prompt": "x", "tier": "broken"})
    assert (r.status_code, r.json()["error"]["code"]) == (503, "model_unavailable")
    assert client.post("/v1/images", json=DRAFT).status_code == 200


def test_models_lists_every_revision_with_its_tiers(client, lock_entries):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {*lock_entries, "broken"}
    assert models["tiny-draft"]["tiers"] == ["draft"]
    assert models["tiny-spare"]["tiers"] == []
    assert models["tiny-final"]["deployment"] == lock_entries["tiny-final"].deployment_name


def test_cli_generate_writes_the_images(stack, tmp_path, api_key):
    out = tmp_path / "fox.png"
    env = {**os.environ, "IMAGEGEN_API_KEY": api_key}
    run = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "a red fox", "--tier", "final",
         "-n", "2", "--seed", "5", "-o", str(out), "--url", stack],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "fox-1.png").format == "PNG"
    assert "tiny-final" in run.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "x", "--tier", "gold", "--url", stack],
        check=False, capture_output=True, text=True, timeout=60, env=env,
    )
    assert bad.returncode == 1 and "unknown_tier" in bad.stderr
    anonymous = subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", "x", "--url", stack,
         "--api-key", "ig_aaaaaaaaaaaa_" + "b" * 27],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert anonymous.returncode == 1 and "401 unauthenticated" in anonymous.stderr


def test_every_replica_runs_serves_throughput_data_path(client):
    """The ingress and every model replica run with serve/local.py's SERVE_ENV (handle
    calls over gRPC, user code on the replica's loop: issue 18), read from each
    worker process's own environment, where Serve reads it at start."""
    import psutil

    from serve.local import SERVE_ENV

    assert client.get("/healthz").status_code == 200
    replicas = {}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:imagegen:"):
            replicas[title.split()[0]] = p.environ()
    assert SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert any(":Ingress" in t for t in replicas) and any("tiny-draft" in t for t in replicas)
    for title, env in replicas.items():
        assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, title


def test_a_replica_to_replica_message_past_grpcs_default_cap_arrives(stack):
    """The ingress calls models by value over gRPC (ingress.BY_REFERENCE), whose messages
    stop at 4 MiB by default (a batch of 8 raw 1024x1024 images is 24 MiB): with
    SERVE_ENV's limit a 6 MiB answer between two replicas of the session's cluster
    arrives whole."""
    from ray import serve as ray_serve

    @ray_serve.deployment(ray_actor_options={"num_cpus": 0})
    class Big:
        def __call__(self) -> bytes:
            return b"x" * (6 << 20)

    @ray_serve.deployment(ray_actor_options={"num_cpus": 0})
    class Caller:
        def __init__(self, big) -> None:
            self.big = big.options(_by_reference=False)  # as the ingress calls models

        async def __call__(self) -> int:
            return len(await self.big.remote())

    handle = ray_serve.run(Caller.bind(Big.bind()), name="grpc-limit", route_prefix=None)
    try:
        assert handle.remote().result(timeout_s=60) == 6 << 20
    finally:
        ray_serve.delete("grpc-limit")
