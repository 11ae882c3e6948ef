"""Batch jobs through the real stack: a batch submitted over HTTP runs in the
ingress's worker through the same service path (its images stored, readable as the
owner's), and a cancelled batch runs no more items."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve


def wait_done(client, batch_id: str, deadline_s: float = 90) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        b = client.get(f"/v1/batches/{batch_id}").json()
        if b["state"] != "running":
            return b
        assert time.monotonic() < end, f"batch {batch_id} still running: {b}"
        time.sleep(0.3)


def test_a_batch_runs_through_the_service_path(client, stack_settings):
    tag = uuid.uuid4().hex[:6]
    r = client.post("/v1/batches", json={"requests": [
        {"prompt": f"a fox {tag}"}, {"prompt": f"a heron {tag}", "n": 2},
        {"prompt": f"a kettle {tag}", "output_format": "webp"}]})
    assert r.status_code == 200, r.text
    b = wait_done(client, r.json()["id"])
    assert b["state"] == "completed" and b["counts"]["succeeded"] == 3 and b["progress"] == 1
    results = client.get(f"/v1/batches/{b['id']}/results").json()
    assert [x["state"] for x in results] == ["succeeded"] * 3
    assert len(results[1]["result"]["images"]) == 2
    image = client.get(f"/v1/images/{results[2]['result']['images'][0]}").json()
    assert image["mime_type"] == "image/webp" and image["request_id"].startswith(b["id"])
    assert b["id"] in [x["id"] for x in client.get("/v1/batches").json()]
    # its manifest in the object store: the results, one JSON line per item
    assert b["manifest"] == f"batches/{b['id']}/results.jsonl"
    store = Path(stack_settings["storage_url"].removeprefix("file://"))
    lines = (store / b["manifest"]).read_text().splitlines()
    assert [json.loads(x) for x in lines] == results


def test_a_bad_item_refuses_the_batch_and_a_cancelled_batch_stops(client):
    bad = client.post("/v1/batches", json={"requests": [{"prompt": "a fox"},
                                                        {"prompt": "a n.u.d.e figure"}]})
    assert bad.status_code == 403
    assert bad.json()["error"]["details"][0]["field"] == "requests.1.prompt"
    many = client.post("/v1/batches", json={"requests": [
        {"prompt": f"a lantern {i}", "tier": "final"} for i in range(40)]}).json()
    cancelled = client.post(f"/v1/batches/{many['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    time.sleep(1.5)
    later = client.get(f"/v1/batches/{many['id']}").json()
    ended = later["counts"]["succeeded"] + later["counts"]["cancelled"] + later["counts"]["dead"]
    assert ended == 40 and later["counts"]["pending"] == 0


def test_a_jsonl_file_is_a_batch_and_a_bad_line_is_named(client):
    tag = uuid.uuid4().hex[:6]
    lines = f'{{"prompt": "a fox {tag}"}}\n\n{{"prompt": "a heron {tag}", "size": "64x64"}}\n'
    r = client.post("/v1/batches", params={"id": f"jsonl_{tag}", "completion_window_s": 3600},
                    content=lines, headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"jsonl_{tag}" and sum(r.json()["counts"].values()) == 2
    assert r.json()["deadline"] - r.json()["created"] == 3600
    assert wait_done(client, r.json()["id"])["counts"]["succeeded"] == 2
    bad = client.post("/v1/batches", content='{"prompt": "a fox"}\n{"prompt": \n',
                      headers={"Content-Type": "application/x-ndjson"})
    assert bad.status_code == 400 and "line 2" in bad.json()["error"]["message"]
    assert bad.json()["error"]["code"] == "malformed_body"
