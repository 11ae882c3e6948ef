"""A blocked request's way through the review queue, over HTTP as each role calls
it: recorded with hashes (the text only when configured, never for the restricted
category), listed and decided by reviewers (counted by reason), restricted cases
for admins only, appealed by the blocked caller alone; an image case's evidence
served under the same roles and saved by the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.config import ROOT
from serve.imaging import encode_png
from serve.ingress.http import build_http_app
from serve.quotas.auth import Authenticator
from serve.quotas.keys import open_keys
from serve.quotas.principals import new_key, record_for
from serve.routing import LiveRouting
from serve.safety.policy import LivePolicy, load_policy_file
from serve.safety.review import FlaggedImage, new_item, open_review, sha256
from serve.service import ImageService
from serve.telemetry import Metrics


def image_case(**extra):
    """(an image case of two images, the second flagged, its evidence)."""
    png = encode_png(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    shot = FlaggedImage(index=1, action="blur", category="sexual", score=0.9,
                        scores={"sexual": 0.9}, sha256=hashlib.sha256(png).hexdigest(),
                        width=8, height=6)
    fields = {"kind": "image", "stage": "image_safety", "category": "sexual",
              "reason": "sexual_content", "field": "images", "principal": "alice",
              "request_id": "req-img", "prompt_sha256": sha256("p"),
              "negative_prompt_sha256": sha256(""), "images": [shot],
              "classifier": "fake"} | extra
    return new_item(**fields), {1: png}


@pytest.fixture
def world(lock, routing, backend, tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    store = open_keys(url)
    keys = {}
    for name, roles in (("alice", ("user",)), ("bob", ("user",)), ("rita", ("reviewer",)),
                        ("ada", ("admin",))):
        key_id, key = new_key()
        asyncio.run(store.add(record_for(key, key_id, name, roles)))
        keys[name] = key
    metrics = Metrics("prometheus")
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend,
                     auth=Authenticator(store), review=open_review(url),
                     policy=LivePolicy(load_policy_file(
                         ROOT / "serve" / "safety" / "prompt_policy.yaml")))

    async def ready():
        return True, {}

    app = build_http_app(s, ready, max_body_bytes=8192, metrics=metrics)

    def client(who):
        return TestClient(app, headers={"Authorization": f"Bearer {keys[who]}"})

    return s, client, metrics


def test_a_block_is_recorded_reviewed_and_appealed(world):
    _, client, metrics = world
    alice, bob, rita, ada = (client(w) for w in ("alice", "bob", "rita", "ada"))
    blocked = alice.post("/v1/images", json={"prompt": "a n.u.d.e figure"},
                         headers={"X-Request-Id": "req-1"})
    assert blocked.status_code == 403
    minors = alice.post("/v1/images", json={"prompt": "nude child"},
                        headers={"X-Request-Id": "req-2"})
    assert minors.status_code == 403
    assert alice.get("/v1/review").status_code == 403  # a user is no reviewer
    queue = rita.get("/v1/review").json()
    assert [(i["request_id"], i["reason"], i["principal"]) for i in queue] == [
        ("req-1", "sexual_content", "alice")]  # the restricted case is not in it
    case = queue[0]
    assert case["prompt"] is None and case["prompt_sha256"] == sha256("a n.u.d.e figure")
    assert rita.get("/v1/review", params={"restricted": "true"}).status_code == 403
    restricted = ada.get("/v1/review", params={"restricted": "true"}).json()
    assert [(i["request_id"], i["reason"], i["prompt"]) for i in restricted] == [
        ("req-2", "csam", None)]
    assert rita.get(f"/v1/review/{restricted[0]['id']}").status_code == 403

    # the blocked caller appeals; nobody else can, nor for a request never blocked
    assert bob.post("/v1/appeals", json={"request_id": "req-1", "message": "mine"}
                    ).status_code == 404
    assert alice.post("/v1/appeals", json={"request_id": "nope", "message": "x"}
                      ).status_code == 404
    appealed = alice.post("/v1/appeals", json={"request_id": "req-1",
                                               "message": "it is a statue"})
    assert appealed.status_code == 200  # a receipt: never the case's scores or decision
    assert appealed.json() == {"case": case["id"], "request_id": "req-1", "appeals": 1,
                               "status": "open"}
    assert rita.get(f"/v1/review/{case['id']}").json()["appeals"][0]["message"] == \
        "it is a statue"

    decided = rita.post(f"/v1/review/{case['id']}/decision",
                        json={"decision": "approved", "reason": "false_positive_art"})
    assert decided.status_code == 200
    assert (decided.json()["status"], decided.json()["decision"]["by"]) == ("approved", "rita")
    assert rita.get("/v1/review").json() == []
    assert [i["id"] for i in rita.get("/v1/review", params={"status": "approved"}).json()] == [
        case["id"]]
    assert metrics.registry.get_sample_value("imagegen_review_decisions_total", {
        "decision": "approved", "reason": "false_positive_art"}) == 1


def test_an_image_case_serves_its_evidence_under_its_roles(world):
    s, client, _ = world
    case, evidence = image_case()
    minors, minors_evidence = image_case(category="sexual_minors", reason="csam",
                                         request_id="req-img-2", restricted=True)
    asyncio.run(s.review.add(case, evidence))
    asyncio.run(s.review.add(minors, minors_evidence))
    bob, rita, ada = (client(w) for w in ("bob", "rita", "ada"))

    got = rita.get(f"/v1/review/{case.id}/images/1")
    assert got.status_code == 200 and got.content == evidence[1]
    assert got.headers["content-type"] == "image/png"
    assert got.headers["cache-control"] == "no-store"
    assert hashlib.sha256(got.content).hexdigest() == case.images[0].sha256
    assert bob.get(f"/v1/review/{case.id}/images/1").status_code == 403  # no reviewer
    assert rita.get(f"/v1/review/{minors.id}/images/1").status_code == 403  # admin only
    assert ada.get(f"/v1/review/{minors.id}/images/1").content == minors_evidence[1]
    for path, code in ((f"/v1/review/{case.id}/images/0", 404),  # not a flagged one
                       ("/v1/review/nope/images/1", 404),
                       (f"/v1/review/{case.id}/images/-1", 422),
                       # past SQLite's integers: refused before the store (it was a 500)
                       (f"/v1/review/{case.id}/images/145885527696668656033333248", 422),
                       (f"/v1/review/{case.id}/images/x", 422)):
        r = rita.get(path)
        assert r.status_code == code and "error" in r.json(), path


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/v1/review/x/decision", {"decision": "maybe", "reason": "x"}, 422),
    ("/v1/review/x/decision", {"decision": "approved", "reason": "Not A Code"}, 422),
    ("/v1/review/x/decision", {"decision": "approved", "reason": "ok"}, 404),
    ("/v1/appeals", {"request_id": "", "message": "x"}, 422),
    ("/v1/appeals", {"request_id": "r", "message": "x", "extra": 1}, 422),
])
def test_bad_review_input_is_a_4xx_in_the_envelope(world, path, body, code):
    _, client, _ = world
    who = "rita" if "review" in path else "alice"
    r = client(who).post(path, json=body)
    assert r.status_code == code and "error" in r.json()


def test_a_bad_query_parameter_is_a_422_in_the_envelope(world):
    _, client, _ = world
    r = client("rita").get("/v1/review", params={"status": "sideways"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_the_cli_lists_and_decides_and_texts_are_kept_only_when_configured(
        lock, routing, backend, tmp_path, monkeypatch, capsys):
    from serve.cli.main import main
    from serve.errors import PromptBlocked
    from serve.quotas.principals import Principal
    from serve.schemas import GenerateRequest

    url = f"sqlite://{tmp_path / 'state.db'}"
    monkeypatch.setenv("IMAGEGEN_STATE_URL", url)
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend,
                     review=open_review(url), keep_prompts=True,
                     policy=LivePolicy(load_policy_file(
                         ROOT / "serve" / "safety" / "prompt_policy.yaml")))
    who = Principal(name="alice", roles=frozenset({"user"}), plan="default")
    for prompt, rid in (("a p0rn scene", "r1"), ("nude kid", "r2")):
        with pytest.raises(PromptBlocked):
            asyncio.run(s.generate(GenerateRequest(prompt=prompt), rid, who))
    review = open_review(url)
    kept = asyncio.run(review.list())
    hidden = asyncio.run(review.list(restricted=True))
    assert kept[0].prompt == "a p0rn scene" and hidden[0].prompt is None
    assert main(["review", "list"]) == 0
    assert kept[0].id in capsys.readouterr().out
    assert main(["review", "reject", kept[0].id, "--reason", "true_positive", "--by", "rita"]) == 0
    assert asyncio.run(review.get(kept[0].id)).decision.by == "rita"
    assert main(["review", "approve", kept[0].id, "--reason", "Bad Code", "--by", "x"]) == 2
    assert main(["review", "show", "nope"]) == 1
    capsys.readouterr()
    # the report lists the restricted cases only, hashes and facts, never a prompt
    assert main(["review", "report"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["reason"], x["request_id"]) for x in lines] == [
        (hidden[0].id, "csam", "r2")]
    assert lines[0]["prompt_sha256"] == hidden[0].prompt_sha256 and "prompt" not in lines[0]
    assert main(["review", "report", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""


def test_the_cli_saves_an_image_cases_evidence(tmp_path, monkeypatch, capsys):
    from serve.cli.main import main

    url = f"sqlite://{tmp_path / 'state.db'}"
    monkeypatch.setenv("IMAGEGEN_STATE_URL", url)
    case, evidence = image_case()
    review = open_review(url)
    asyncio.run(review.add(case, evidence))
    asyncio.run(review.close())
    out = tmp_path / "out" / "cases"
    assert main(["review", "show", case.id, "--save-images", str(out)]) == 0
    saved = out / f"{case.id}-1.png"
    assert saved.read_bytes() == evidence[1]
    assert f"wrote {saved}" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == [saved.name]
    assert main(["review", "show", case.id, "--save-images", str(saved)]) == 1  # a file
    assert "error: cannot write" in capsys.readouterr().err
