"""Storage, cache and delivery through the real stack and its real clients: an
identical request is a cache hit with no model call (the counter, and the model
replicas' own pipeline count unchanged); a URL answer is fetched for real, with its
immutable cache headers and ETag; the sidecar is its owner's alone; a reroll; the
openai client gets a URL and WebP."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def other_key(stack_settings) -> str:
    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    async def make() -> str:
        store = open_keys(stack_settings["state_url"])
        key_id, key = new_key()
        await store.add(record_for(key, key_id, "someone-else", ("user",)))
        await store.close()
        return key

    return asyncio.run(make())


def pipeline_images(stack_settings) -> float:
    """Images the model replicas generated, from Ray's own metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{stack_settings['metrics_port']}/metrics",
                     timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_imagegen_pipeline_images_total{"))


def test_an_identical_request_is_answered_from_the_store(client, stack_settings):
    # a prompt no other test of the session sends: its first request is a miss
    body = {"prompt": f"a lighthouse at dusk, {uuid.uuid4().hex[:8]}", "seed": 1234, "n": 2}
    first = client.post("/v1/images", json=body).json()
    assert not first["cached"] and all(i["id"].startswith("img_") for i in first["images"])
    time.sleep(2.5)  # Ray exports metrics every second here
    before = pipeline_images(stack_settings)
    t = time.perf_counter()
    again = client.post("/v1/images", json=body).json()
    hit_ms = (time.perf_counter() - t) * 1e3
    assert again["cached"] and again["batch_images"] == 0
    assert [i["b64_json"] for i in again["images"]] == [i["b64_json"] for i in first["images"]]
    assert again["cost_units"] == pytest.approx(first["cost_units"] * 0.1, abs=1e-6)
    time.sleep(2.5)
    assert pipeline_images(stack_settings) == before  # no model ran
    assert hit_ms < 2000  # (bench cache measures it; this only says no model queue)


def test_a_url_answer_is_fetched_with_immutable_headers_and_the_sidecar_is_the_owners(
        client, stack, other_key):
    r = client.post("/v1/images", json={"prompt": f"a red kettle {uuid.uuid4().hex[:6]}",
                                        "seed": 77,
                                        "response_format": "url", "output_format": "webp",
                                        "approval_id": "CAMPAIGN-7"}).json()
    img = r["images"][0]
    assert img["b64_json"] is None and img["url"].startswith(f"{stack}/v1/files/objects/")
    got = httpx.get(img["url"], timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    cache = got.headers["cache-control"]  # the caller's own: no shared cache, link-long
    assert cache.startswith("private, max-age=") and 0 < int(cache.split("=")[1]) <= 3600
    assert Image.open(io.BytesIO(got.content)).size == (img["width"], img["height"])
    etag = got.headers["etag"]
    assert httpx.get(img["url"], headers={"If-None-Match": etag}, timeout=10).status_code == 304
    forged = img["url"].rsplit("sig=", 1)[0] + "sig=" + "0" * 32
    assert httpx.get(forged, timeout=10).status_code == 404

    mine = client.get(f"/v1/images/{img['id']}")
    assert mine.status_code == 200
    sidecar = mine.json()
    assert (sidecar["approval_id"], sidecar["seed"], sidecar["mime_type"]) == (
        "CAMPAIGN-7", 77, "image/webp")
    assert "owner" not in sidecar and sidecar["url"].startswith(stack)
    theirs = httpx.get(f"{stack}/v1/images/{img['id']}", timeout=10,
                       headers={"Authorization": f"Bearer {other_key}"})
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found"

    rerolled = client.post(f"/v1/images/{img['id']}/reroll", json={})
    assert rerolled.status_code == 200
    new = rerolled.json()["images"][0]
    assert new["seed"] != 77 and new["mime_type"] == "image/webp" and new["url"]
    assert client.post(f"/v1/images/{img['id']}/reroll", json={"seed": 77}).json()["cached"]
    assert httpx.post(f"{stack}/v1/images/{img['id']}/reroll", json={}, timeout=30,
                      headers={"Authorization": f"Bearer {other_key}"}).status_code == 404


def test_the_openai_client_gets_a_url_and_webp(stack, api_key):
    import openai

    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=api_key, max_retries=0)
    r = client.images.generate(prompt="a paper boat", model="draft", response_format="url",
                               output_format="webp", extra_body={"seed": 5})
    got = httpx.get(r.data[0].url, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    b64 = client.images.generate(prompt="a paper boat", model="draft", output_format="jpeg",
                                 output_compression=60, extra_body={"seed": 5})
    assert Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json))).format == "JPEG"
