"""Templates through the real stack and its real clients: a template and variables
on HTTP, the openai client (its `prompt` fills the free-text variable) and gRPC (a
variables map), each answered with the template's rendering, alt text and ref."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.serve


def test_a_template_renders_on_every_transport(stack, stack_settings, auth_headers, api_key):
    import openai
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    r = httpx.post(f"{stack}/v1/images", headers=auth_headers, timeout=60, json={
        "template": "product-shot", "variables": {"product": "a brass lamp",
                                                  "background": "black"}})
    assert r.status_code == 200, r.text
    assert r.json()["template"] == "product-shot@1"
    assert r.json()["images"][0]["alt_text"]["text"] == "Photo of a brass lamp on a black background"
    bad = httpx.post(f"{stack}/v1/images", headers=auth_headers, timeout=60, json={
        "template": "product-shot", "variables": {"product": "(lamp:1.5)"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_variable"

    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=api_key, max_retries=0)
    o = client.images.generate(prompt="a heron by a lake", model="draft",
                               extra_body={"template": "watercolor",
                                           "variables": {"season": "autumn"}})
    ext = o.model_extra["imagegen"]
    assert ext["template"] == "watercolor@2"
    assert ext["alt_text"] == ["Watercolor illustration of a heron by a lake in autumn"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", model="draft", extra_body={"template": "nope"})
    assert e.value.code == "unknown_template"

    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
        g = pb_grpc.ImagesStub(ch).Generate(pb.GenerateRequest(
            template="watercolor@1", prompt="a boat", variables={"mood": "joyful"}), timeout=60)
    assert (g.template, g.template_successor, g.template_sunset) == (
        "watercolor@1", "watercolor@2", "2027-06-30")
    assert g.images[0].alt_text == "Watercolor illustration of a boat"
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
        listed = pb_grpc.ImagesStub(ch).ListTemplates(pb.ListTemplatesRequest(), timeout=10)
    by_ref = {f"{t.id}@{t.version}": t for t in listed.templates}
    assert by_ref.keys() == {t["id"] + "@" + str(t["version"]) for t in httpx.get(
        f"{stack}/v1/templates", headers=auth_headers, timeout=10).json()["templates"]}
    old = by_ref["watercolor@1"]
    assert (old.status, old.successor, old.deprecated_on) == ("deprecated", "watercolor@2",
                                                              "2027-06-30")
    assert list(old.variables["mood"].values) == ["calm", "joyful", "mysterious"]
    assert old.variables["scene"].default == "" and old.free_text == "scene"
