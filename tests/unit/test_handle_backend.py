"""The ingress backend: concurrent requests for one model leave as one handle
call, per-request errors come back to their caller only, and Ray failures map
onto the error table. A fake handle stands in for Serve (no cluster)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from serve.deployments.ingress import Coalescing, HandleBackend, HandleClassifier
from serve.deployments.model import ModelCall
from serve.engines.base import Generated, Job
from serve.errors import GenerationFailed, ModelUnavailable, Overloaded
from serve.safety.classifier import ClassifierUnavailable


def job(seed: int) -> Job:
    return Job("p", "", 8, 8, 1, 1.0, seed)


class FakeHandle:
    """`.options(method_name=...).remote(requests)` like a DeploymentHandle."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[list[list[int]]] = []
        self.release = asyncio.Event()
        self.fail = fail

    def options(self, method_name: str, **options) -> FakeHandle:
        assert method_name in ("generate", "classify")
        # by value over gRPC (serve/deployments/ingress.py BY_REFERENCE), whatever the
        # process's RAY_SERVE_USE_GRPC_BY_DEFAULT said
        assert options == {"_by_reference": False}
        return self

    def remote(self, calls: list[ModelCall]):
        self.traceparents = [c.traceparent for c in calls]
        requests = [c.jobs for c in calls]
        self.calls.append([[j.seed for j in r] for r in requests])

        async def answer():
            await self.release.wait()
            if self.fail:
                raise self.fail
            return [
                GenerationFailed("bad seed") if r[0].seed == 13 else
                Generated([np.zeros((8, 8, 3), np.uint8)] * len(r), 0.0, 0.01, 0)
                for r in requests
            ]

        self.response = FakeResponse(answer())
        return self.response


class FakeResponse:
    """A DeploymentResponse: awaitable, and cancel() stops the replica's work."""

    def __init__(self, coro) -> None:
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


def backend(handle: FakeHandle, max_calls: int = 1, max_queued: int | None = None):
    return HandleBackend({"m": handle}, {"m": Coalescing(8, max_calls, max_queued)})


def test_concurrent_requests_leave_as_one_call():
    async def main():
        h = FakeHandle()
        b = backend(h)
        first = asyncio.create_task(b.generate("m", [job(0)]))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(b.generate("m", [job(s), job(s + 1)])) for s in (2, 4, 6)]
        await asyncio.sleep(0.01)
        h.release.set()
        return h, await asyncio.gather(first, *rest)

    h, results = asyncio.run(main())
    assert h.calls == [[[0]], [[2, 3], [4, 5], [6, 7]]]
    assert [len(r.images) for r in results] == [1, 2, 2, 2]


def test_a_per_request_error_reaches_only_its_caller():
    async def main():
        h = FakeHandle()
        h.release.set()
        b = backend(h)
        return await asyncio.gather(b.generate("m", [job(13)]), b.generate("m", [job(1)]),
                                    return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, GenerationFailed)
    assert isinstance(good, Generated)


def grpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """What Serve's by-value gRPC hop raises past its own mapping (a message over the
    size cap is RESOURCE_EXHAUSTED)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="Received message larger than max")


@pytest.mark.parametrize(("fail", "expected"), [
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), Overloaded),
    (grpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), ModelUnavailable),
    (grpc_error(grpc.StatusCode.INTERNAL), ModelUnavailable),
])
def test_ray_failures_map_onto_the_error_table(fail, expected):
    async def main():
        h = FakeHandle(fail)
        h.release.set()
        return await backend(h).generate("m", [job(1)])

    with pytest.raises(expected):
        asyncio.run(main())


def test_a_full_ingress_queue_is_overloaded_not_unbounded():
    async def main():
        h = FakeHandle()
        b = backend(h, max_calls=1, max_queued=1)
        running = asyncio.create_task(b.generate("m", [job(0)]))
        await asyncio.sleep(0)
        queued = asyncio.create_task(b.generate("m", [job(1)]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.generate("m", [job(2)])
        h.release.set()
        await asyncio.gather(running, queued)

    asyncio.run(main())


def test_a_call_whose_requests_all_left_is_cancelled_in_the_replica():
    async def main():
        h = FakeHandle()  # never released: the call runs until cancelled
        b = backend(h)
        a, c = (asyncio.create_task(b.generate("m", [job(s)])) for s in (2, 3))
        await asyncio.sleep(0.01)
        assert h.calls == [[[2], [3]]]  # merged into one call
        a.cancel()
        await asyncio.sleep(0.01)
        kept = h.response.cancelled  # c still waits for it
        c.cancel()
        await asyncio.sleep(0.01)
        return kept, h.response.cancelled

    kept, cancelled = asyncio.run(main())
    assert not kept and cancelled


def test_a_call_ray_cancelled_is_model_unavailable_not_a_hang():
    from serve.errors import ModelUnavailable

    async def main():
        h = FakeHandle(fail=asyncio.CancelledError())  # the replica stopped mid-call
        h.release.set()
        return await asyncio.wait_for(backend(h).generate("m", [job(1)]), 2)

    with pytest.raises(ModelUnavailable, match="cancelled"):
        asyncio.run(main())


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INTERNAL])
def test_a_classifier_call_failing_over_grpc_is_classifier_unavailable(code):
    """Stage 9 then fails open or closed as configured, never a 500."""
    class Failing:
        def options(self, method_name, _by_reference):
            assert not _by_reference
            return self

        def remote(self, images):
            async def answer():
                raise grpc_error(code)
            return FakeResponse(answer())

    with pytest.raises(ClassifierUnavailable, match=code.name):
        asyncio.run(HandleClassifier(Failing(), "c", lambda: 5.0).classify([]))
