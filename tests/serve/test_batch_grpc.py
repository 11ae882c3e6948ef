"""Batch jobs over gRPC through the real stack: the same service calls as the HTTP
routes (tests/serve/test_batch_stack.py), a batch run by the ingress's worker, its
items' images readable with GetImage, a bad item refusing the batch with the status
from the one table, cancel, and another's or an unknown batch NOT_FOUND."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
import pytest
from grpc_key import keyed_channel

from serve.ingress.grpc import CODE_KEY, DETAILS_KEY
from serve.ingress.proto import images_pb2 as pb
from serve.ingress.proto import images_pb2_grpc as pb_grpc
from serve.local import DIRECT_INGRESS_PORTS

pytestmark = pytest.mark.serve


def _stub(stack_settings, key: str, via: str = "direct"):
    port = stack_settings["grpc_port"] + (DIRECT_INGRESS_PORTS if via == "proxy" else 0)
    return keyed_channel(f"127.0.0.1:{port}", key)


@pytest.fixture(scope="module")
def channel(stack, stack_settings, api_key):
    with _stub(stack_settings, api_key) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return pb_grpc.ImagesStub(channel)


@pytest.fixture(scope="module")
def other_key(stack_settings) -> str:
    """A key of another principal, without the admin role."""
    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    async def make() -> str:
        store = open_keys(stack_settings["state_url"])
        key_id, key = new_key()
        await store.add(record_for(key, key_id, "batch-stranger", ("user",)))
        await store.close()
        return key

    return asyncio.run(make())


def wait_done(stub, batch_id: str, deadline_s: float = 90) -> pb.Batch:
    end = time.monotonic() + deadline_s
    while True:
        b = stub.GetBatch(pb.BatchRef(id=batch_id), timeout=10)
        if b.state != "running":
            return b
        assert time.monotonic() < end, f"batch {batch_id} still running: {b}"
        time.sleep(0.3)


def _refused(rpc, message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        rpc(message, timeout=30)
    return info.value


def test_a_batch_runs_and_its_images_are_the_owners(stub, client):
    tag = uuid.uuid4().hex[:6]
    b = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[
        pb.GenerateRequest(prompt=f"a fox {tag}", seed=11),
        pb.GenerateRequest(prompt=f"a heron {tag}", n=2),
        pb.GenerateRequest(prompt=f"a kettle {tag}", output_format="webp")]), timeout=30)
    assert b.id.startswith("b_") and b.state == "running" and sum(b.counts.values()) == 3
    done = wait_done(stub, b.id)
    assert (done.state, done.counts["succeeded"], done.progress) == ("completed", 3, 1.0)
    items = stub.GetBatchResults(pb.BatchRef(id=b.id), timeout=10).items
    assert [(i.index, i.state, i.error) for i in items] == [
        (0, "succeeded", ""), (1, "succeeded", ""), (2, "succeeded", "")]
    assert list(items[0].result.seeds) == [11] and len(items[1].result.image_ids) == 2
    image = stub.GetImage(pb.ImageRef(id=items[2].result.image_ids[0]), timeout=10)
    assert image.mime_type == "image/webp" and image.request_id.startswith(b.id)
    assert image.revision == items[2].result.revision
    # the same batch as HTTP shows it, every field (an absent one is empty here)
    view = client.get(f"/v1/batches/{b.id}").json()
    got = {f.name: getattr(done, f.name) for f in pb.Batch.DESCRIPTOR.fields}
    assert {**got, "counts": dict(done.counts)} == {
        k: "" if v is None else v for k, v in view.items()}
    http = client.get(f"/v1/batches/{b.id}/results").json()
    assert [list(i.result.image_ids) for i in items] == [x["result"]["images"] for x in http]
    assert b.id in [x.id for x in stub.ListBatches(pb.ListBatchesRequest(), timeout=10).batches]


@pytest.mark.parametrize(("bad", "status", "code", "field"), [
    (pb.GenerateRequest(prompt="a n.u.d.e figure"), "PERMISSION_DENIED", "prompt_blocked",
     "requests.1.prompt"),
    (pb.GenerateRequest(prompt="a fox", size="100x64"), "INVALID_ARGUMENT", "invalid_request",
     "requests.1.size"),
], ids=["blocked", "bad-size"])
def test_a_bad_item_refuses_the_batch_naming_it(stub, bad, status, code, field):
    tag = uuid.uuid4().hex[:8]
    e = _refused(stub.SubmitBatch, pb.SubmitBatchRequest(id=f"bad_{tag}", requests=[
        pb.GenerateRequest(prompt="a fox"), bad]))
    trailers = dict(e.trailing_metadata())
    assert e.code() == grpc.StatusCode[status] and trailers[CODE_KEY] == code
    assert json.loads(trailers[DETAILS_KEY])[0]["field"] == field
    assert "requests[1]" in e.details() and "Traceback" not in e.details()
    # nothing was queued under its id
    assert _refused(stub.GetBatch, pb.BatchRef(id=f"bad_{tag}")).code() == \
        grpc.StatusCode.NOT_FOUND


def test_a_cancelled_batch_stops_through_the_proxy(stack_settings, api_key):
    with _stub(stack_settings, api_key, via="proxy") as ch:
        stub = pb_grpc.ImagesStub(ch)
        many = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[
            pb.GenerateRequest(prompt=f"a lantern {i}", tier="final") for i in range(40)]),
            timeout=30)
        cancelled = stub.CancelBatch(pb.BatchRef(id=many.id), timeout=10)
        assert cancelled.state == "cancelled" and cancelled.counts["cancelled"] > 0
        time.sleep(1.5)  # items running when it was cancelled finish
        later = stub.GetBatch(pb.BatchRef(id=many.id), timeout=10)
    ended = sum(later.counts[s] for s in ("succeeded", "cancelled", "dead"))
    assert later.state == "cancelled" and ended == 40 and later.counts["pending"] == 0


def test_another_callers_or_an_unknown_batch_is_not_found(stub, stack_settings, other_key):
    mine = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[
        pb.GenerateRequest(prompt="a quiet pond")]), timeout=30)
    with _stub(stack_settings, other_key) as ch:
        theirs = pb_grpc.ImagesStub(ch)
        for rpc in (theirs.GetBatch, theirs.CancelBatch, theirs.GetBatchResults):
            e = _refused(rpc, pb.BatchRef(id=mine.id))
            assert e.code() == grpc.StatusCode.NOT_FOUND
            assert dict(e.trailing_metadata())[CODE_KEY] == "not_found"
        assert mine.id not in [b.id for b in theirs.ListBatches(pb.ListBatchesRequest(),
                                                                 timeout=10).batches]
    e = _refused(stub.GetBatch, pb.BatchRef(id="b_" + "0" * 24))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "b_000" in e.details()
    # the stranger's cancel did nothing: the owner's batch still runs or has completed
    assert stub.GetBatch(pb.BatchRef(id=mine.id), timeout=10).state != "cancelled"
