"""The batch worker over every state store backend (the `state_url` fixture): a batch
drained by two workers exactly once, a worker killed mid-batch and its items finished
by another, retries with full-jitter delays, the dead-letter queue and replay, cancel
while the webhook endpoint is down, yielding to interactive traffic, and a completion
webhook sent once (a real HTTP server on 127.0.0.1, in a thread). `run` is a fake
generate scripted per item; time is a fake clock where the test moves it."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.batch import Batch, open_queue
from serve.batch.queue import ITEM_STATES
from serve.batch.webhooks import Webhooks, backoff, verify
from serve.batch.worker import BatchWorker, describe, retryable
from serve.errors import (
    ConfigError,
    GenerationFailed,
    ImagegenError,
    InvalidRequest,
    LimitExceeded,
    ModelTimeout,
    Overloaded,
    PromptBlocked,
    QuotaExceeded,
    StateUnavailable,
    StorageUnavailable,
    TierDisabled,
    UnknownTemplate,
)

T0 = 1_700_000_000.0
SECRET = b"0123456789abcdef0123456789abcdef"
DEADLINE_S = 20.0  # every wait of a test is bounded by this


def run(url, fn, queues: int = 1):
    async def main():
        qs = [open_queue(url) for _ in range(queues)]
        try:
            return await asyncio.wait_for(fn(*qs), DEADLINE_S + 10)
        finally:
            for q in qs:
                await q.close()

    return asyncio.run(main())


def batch(bid: str, created: float = T0, **extra) -> Batch:
    return Batch(id=bid, principal="alice", created=created, **extra)


def reqs(n: int) -> list[dict]:
    return [{"prompt": f"a fox {i}", "tier": "draft", "seed": i} for i in range(n)]


def zeros(**counts) -> dict[str, int]:
    return {s: 0 for s in ITEM_STATES} | counts


async def until(predicate, what: str) -> None:
    """Poll a predicate (plain or async) until true; fail the test after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not await _truth(predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def _truth(value) -> bool:
    return bool(await value if inspect.isawaitable(value) else value)


async def finished(q, bid: str) -> bool:
    got = await q.get(bid)
    return got is not None and not (got.counts["pending"] or got.counts["leased"])


class FakeRun:
    """A fake generate. `plan` maps an item (its index, or its id) to what its
    successive calls do: an exception is raised, an asyncio.Event is waited for, None
    succeeds; past the plan, a call succeeds. The result names the lease it ran under."""

    def __init__(self, plan: dict | None = None, delay_s: float = 0.0) -> None:
        self.plan = plan or {}
        self.delay_s = delay_s
        self.calls: list[tuple[str, str]] = []  # (item id, lease owner)

    def ran(self, prefix: str = "") -> list[str]:
        return [i for i, _ in self.calls if i.startswith(prefix)]

    async def __call__(self, item) -> dict:
        n = sum(i == item.id for i, _ in self.calls)
        self.calls.append((item.id, item.lease_owner))
        steps = self.plan.get(item.id, self.plan.get(item.index, []))
        step = steps[n] if n < len(steps) else None
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if isinstance(step, asyncio.Event):
            await step.wait()
        elif isinstance(step, BaseException):
            raise step
        return {"index": item.index, "lease": item.lease_owner}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """The metrics interface, remembering every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict]] = []

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.calls.append(("inc", name, value, labels))

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.calls.append(("observe", name, value, labels))

    def outcomes(self) -> list[str]:
        return [c[3]["outcome"] for c in self.calls if c[1] == "imagegen_batch_items_total"]


class Receiver(ThreadingHTTPServer):
    """Answers every POST with `status`; remembers (headers, body) of each."""

    daemon_threads = True

    def __init__(self, status: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = status
        self.seen: list[tuple[dict[str, str], bytes]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        if len(body) < length:  # the sender was cancelled mid-request: no delivery
            return
        self.server.seen.append((dict(self.headers.items()), body))
        self.send_response(self.server.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver(request):
    """A receiver answering 200, or the status a test parametrizes it with (indirect)."""
    server = Receiver(getattr(request, "param", 200))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def hooks(receiver: Receiver) -> Webhooks:
    # Retries fast and for long: an endpoint that is down keeps its delivery busy.
    return Webhooks(SECRET, [receiver.base], attempts=10_000, base_delay_s=0.01,
                    max_delay_s=0.05, timeout_s=2.0, rng=random.Random(1))


def worker(q, fake, name: str, **kw) -> BatchWorker:
    kw.setdefault("poll_s", 0.01)
    kw.setdefault("rng", random.Random(5))
    return BatchWorker(q, fake, name=name, **kw)


# -- the error table -------------------------------------------------------------------


@pytest.mark.parametrize(("err", "again"), [
    (Overloaded("full"), True), (ModelTimeout("slow"), True),
    (GenerationFailed("nan"), True), (QuotaExceeded("spent"), True),
    (StateUnavailable("down"), True), (StorageUnavailable("down"), True),
    (TierDisabled("off"), True), (TimeoutError(), True), (OSError("reset"), True),
    (RuntimeError("the replica died"), True),
    (InvalidRequest("bad"), False), (PromptBlocked("no"), False),
    (LimitExceeded("big"), False), (UnknownTemplate("who"), False),
    (ConfigError("lock"), False), (ImagegenError("?"), False),
])
def test_retryable(err, again):
    assert retryable(err) is again


@pytest.mark.parametrize(("err", "text"), [
    (InvalidRequest("width: too big"), "invalid_request: width: too big"),
    (RuntimeError("the replica died"), "internal: RuntimeError: the replica died"),
    (TimeoutError(), "internal: TimeoutError"),
])
def test_describe(err, text):
    assert describe(err) == text


def test_settings_out_of_range_are_refused():
    for bad in ({"lease_s": 0}, {"concurrency": 0}, {"attempts": 0}, {"poll_s": 0}):
        with pytest.raises(ValueError):
            BatchWorker(None, FakeRun(), name="w", **bad)


# -- draining ----------------------------------------------------------------------


def test_two_workers_drain_a_batch_exactly_once(state_url):
    fake = FakeRun(delay_s=0.05)  # idle gaps: neither worker starves the other of the store

    async def body(qa, qb):
        await qa.create(batch("b1"), reqs(30))
        workers = [worker(qa, fake, "A", concurrency=3), worker(qb, fake, "B", concurrency=3)]
        for w in workers:
            w.start()
        await until(lambda: finished(qa, "b1"), "the batch to finish")
        for w in workers:
            await w.stop()
        return await qa.get("b1"), await qa.items("b1")

    got, items = run(state_url, body, queues=2)
    assert got.state == "completed" and got.counts == zeros(succeeded=30)
    assert sorted(fake.ran()) == [i.id for i in items]  # once each
    assert all(i.result == {"index": i.index, "lease": i.lease_owner} and i.attempts == 0
               for i in items)
    assert {i.lease_owner.split(":")[0] for i in items} == {"A", "B"}  # both took part


def test_a_killed_workers_items_are_finished_by_another(state_url):
    hang = asyncio.Event()  # never set: A dies with its runs in flight
    slow, fast = FakeRun({i: [hang] for i in range(6)}), FakeRun()

    async def body(qa, qb):
        await qa.create(batch("b1"), reqs(6))
        a = worker(qa, slow, "A", lease_s=0.3, concurrency=2)
        task = a.start()
        await until(lambda: len(slow.calls) == 2, "A to start two items")
        task.cancel()  # the worker dies mid-run: nothing is recorded, the leases stay
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.05)
        held = await qa.items("b1", state="leased")
        b = worker(qb, fast, "B", lease_s=5, concurrency=2)
        b.start()
        await until(lambda: finished(qa, "b1"), "B to finish the batch")
        await b.stop()
        late = [await qa.complete(iid, owner, {"by": "A"}) for iid, owner in slow.calls]
        return held, late, await qa.get("b1"), await qa.items("b1")

    held, late, got, items = run(state_url, body, queues=2)
    assert sorted((i.id, i.lease_owner) for i in held) == sorted(slow.calls)  # still A's
    assert late == [False, False]  # A's late completes are refused
    c = got.counts
    assert c["succeeded"] + c["dead"] + c["cancelled"] == 6 == c["succeeded"]
    assert sorted(fast.ran()) == [i.id for i in items]  # B ran each once
    assert all(i.result == {"index": i.index, "lease": i.lease_owner} for i in items)
    assert all(i.lease_owner.startswith("B:") for i in items)
    by_id = {i.id: i for i in items}
    for iid, owner in slow.calls:  # the reclaim counted as an attempt
        assert (by_id[iid].attempts, by_id[iid].last_error) == (1, f"lease expired: {owner}")


def test_the_heartbeat_keeps_a_long_item_leased(state_url):
    # An item running 2.5 leases long. The lease is 1 s, renewed every third of it:
    # at 0.2 s a loaded CI machine's stall of a few hundred ms let one lapse.
    slow, other = FakeRun(delay_s=2.5), FakeRun()

    async def body(qa, qb):
        await qa.create(batch("b1"), reqs(1))
        a = worker(qa, slow, "A", lease_s=1.0)
        b = worker(qb, other, "B", lease_s=1.0)
        a.start()
        await until(lambda: len(slow.calls) == 1, "A to start")
        b.start()  # polls all along: a lapsed lease would be taken
        await until(lambda: finished(qa, "b1"), "the item to finish")
        await a.stop()
        await b.stop()
        return await qa.items("b1")

    [item] = run(state_url, body, queues=2)
    assert other.calls == [] and item.lease_owner.startswith("A:") and item.attempts == 0


# -- retries and the dead-letter queue -----------------------------------------------------


def test_retryable_failures_back_off_with_full_jitter_then_succeed(state_url):
    fake, clock, metrics = FakeRun({0: [Overloaded("full"), Overloaded("full")]}), Clock(), \
        Recorder()

    async def body(q):
        await q.create(batch("b1"), reqs(1))
        w = worker(q, fake, "w", base_delay_s=4.0, max_delay_s=60.0, clock=clock,
                   rng=random.Random(3), metrics=metrics)
        seen, delays = [], []
        for _ in range(2):
            seen.append(await w.drain_once())
            [it] = await q.items("b1")
            delays.append(it.not_before - clock.now)
            seen.append(await w.drain_once())  # not due yet
            clock.now = it.not_before
        seen.append(await w.drain_once())
        return seen, delays, await q.items("b1")

    seen, delays, [item] = run(state_url, body)
    assert seen == [1, 0, 1, 0, 1] and len(fake.calls) == 3
    assert (item.state, item.attempts, item.last_error) == ("succeeded", 2, "overloaded: full")
    rng = random.Random(3)  # the same draws, made here
    assert delays == pytest.approx([max(1, backoff(n, 4.0, 60.0, rng)) for n in range(2)])
    for n, d in enumerate(delays):  # full jitter over [0, base * 2**n], Retry-After the floor
        assert Overloaded.retry_after_s <= d <= max(Overloaded.retry_after_s, 4.0 * 2 ** n)
    assert metrics.outcomes() == ["retried", "retried", "succeeded"]
    assert [c[1] for c in metrics.calls if c[0] == "observe"] == [
        "imagegen_batch_item_seconds"] * 3


def test_a_permanent_failure_is_dead_at_once(state_url):
    fake, metrics = FakeRun({0: [InvalidRequest("width: too big")]}), Recorder()

    async def body(q):
        await q.create(batch("b1"), reqs(2))
        n = await worker(q, fake, "w", metrics=metrics).drain_once()
        return n, await q.items("b1"), await q.dead()

    n, items, dead = run(state_url, body)
    assert n == 2 and len(fake.calls) == 2
    assert [(i.state, i.attempts) for i in items] == [("dead", 1), ("succeeded", 0)]
    assert [(i.id, i.last_error) for i in dead] == [("b1-000000",
                                                     "invalid_request: width: too big")]
    assert sorted(metrics.outcomes()) == ["dead", "succeeded"]
    assert ("inc", "imagegen_dead_letters_total", 1, {"queue": "batch"}) in metrics.calls


def test_a_failure_every_time_is_dead_after_its_attempts_then_replayed(state_url):
    fake, clock = FakeRun({0: [GenerationFailed("nan latents")] * 3}), Clock()

    async def body(q):
        await q.create(batch("b1"), reqs(1))
        w = worker(q, fake, "w", attempts=3, clock=clock)
        for _ in range(5):
            await w.drain_once()
            clock.now += 60  # past any retry delay
        dead = await q.dead()
        replayed = await q.replay([i.id for i in dead], now=clock.now)
        n = await w.drain_once()
        return dead, replayed, n, await q.items("b1"), await q.dead()

    dead, replayed, n, [item], left = run(state_url, body)
    assert [(i.attempts, i.last_error) for i in dead] == [(3, "generation_failed: nan latents")]
    assert len(fake.calls) == 4 and (replayed, n) == (1, 1) and left == []
    assert (item.state, item.attempts, item.result["index"]) == ("succeeded", 0, 0)


def test_an_unexpected_exception_is_retried(state_url):
    fake, clock = FakeRun({0: [RuntimeError("the replica died")]}), Clock()

    async def body(q):
        await q.create(batch("b1"), reqs(1))
        w = worker(q, fake, "w", clock=clock)
        await w.drain_once()
        [failed] = await q.items("b1")
        clock.now += 120
        await w.drain_once()
        return failed, await q.items("b1")

    failed, [item] = run(state_url, body)
    assert (failed.state, failed.last_error) == ("pending",
                                                 "internal: RuntimeError: the replica died")
    assert (item.state, item.attempts) == ("succeeded", 1)


# -- cancel, busy, the completion webhook ------------------------------------------------


@pytest.mark.parametrize("receiver", [503], indirect=True, ids=["down"])
def test_cancel_stops_a_batch_while_its_webhook_endpoint_is_down(state_url, receiver):
    gate = asyncio.Event()
    fake = FakeRun({f"a-{i:06d}": [gate] for i in range(6)})

    def posts(bid: str) -> list[dict]:
        return [e for e in (json.loads(b) for _, b in receiver.seen) if e["data"]["id"] == bid]

    async def body(q):
        for bid, n, at in (("first", 1, T0), ("a", 6, T0 + 1), ("b", 4, T0 + 2)):
            await q.create(batch(bid, at, webhook_url=receiver.base), reqs(n))
        w = worker(q, fake, "w", concurrency=2, webhooks=hooks(receiver))
        w.start()
        # "first" has ended: its webhook is being retried against the 503s
        await until(lambda: len(posts("first")) >= 2 and len(fake.ran("a-")) == 2,
                    "two items of a to run")
        t0 = time.monotonic()
        cancelled = await q.cancel("a")
        cancel_s = time.monotonic() - t0
        gate.set()  # the two in flight finish (succeeded: the work was done)
        await until(lambda: finished(q, "b"), "the worker to run batch b")
        seen = len(receiver.seen)
        await until(lambda: len(receiver.seen) > seen, "the deliveries to go on")
        t0 = time.monotonic()
        await w.stop()  # cancels the deliveries still retrying
        return cancelled, cancel_s, time.monotonic() - t0, await q.get("a"), await q.get("b")

    cancelled, cancel_s, stop_s, a, b = run(state_url, body)
    assert cancelled == 4 and cancel_s < 1.0 and stop_s < 1.0
    assert fake.ran("a-") == ["a-000000", "a-000001"]  # no new run after the cancel
    assert a.state == "cancelled" and a.counts == zeros(succeeded=2, cancelled=4)
    assert b.state == "completed" and b.counts == zeros(succeeded=4)
    assert len(fake.ran("b-")) == 4
    assert {e["type"] for e in posts("a")} == {"batch.cancelled"}
    assert posts("a")[0]["data"] == {"id": "a", "counts": zeros(succeeded=2, cancelled=4)}
    assert all(verify(SECRET, h, raw) for h, raw in receiver.seen)


def test_busy_yields_to_interactive_traffic(state_url):
    fake, busy, sleeps = FakeRun(), [True], []

    async def sleep(s: float) -> None:
        sleeps.append(s)
        await asyncio.sleep(s)

    async def body(q):
        await q.create(batch("b1"), reqs(3))
        w = worker(q, fake, "w", busy=lambda: busy[0], sleep=sleep)
        drained = await w.drain_once()
        w.start()
        await asyncio.sleep(0.2)
        while_busy = (list(fake.calls), await q.depth(), len(sleeps))
        busy[0] = False
        await until(lambda: finished(q, "b1"), "the batch to run")
        await w.stop()
        return drained, while_busy, await q.get("b1")

    drained, (calls, depth, slept), got = run(state_url, body)
    assert drained == 0 and calls == [] and depth == {"pending": 3, "waiting": 0, "leased": 0, "dead": 0}
    assert slept >= 3 and set(sleeps[:slept]) == {0.01}  # it polled, never claimed
    assert got.counts == zeros(succeeded=3) and len(fake.calls) == 3


def test_the_completion_webhook_is_sent_once(state_url, receiver):
    both = asyncio.Event()
    started: list[str] = []

    async def together(item) -> dict:
        started.append(item.id)
        if len(started) == 2:
            both.set()
        await both.wait()  # the last two items finish at once, on two workers
        return {"index": item.index}

    async def body(qa, qb):
        await qa.create(batch("b1", webhook_url=receiver.base), reqs(2))
        workers = [worker(q, together, n, concurrency=1, webhooks=hooks(receiver))
                   for q, n in ((qa, "A"), (qb, "B"))]
        for w in workers:
            w.start()
        await until(lambda: receiver.seen, "the webhook")
        for w in workers:
            await w.stop(grace_s=5)
        again = await workers[0].notify_if_done("b1")
        return again, await qa.items("b1")

    again, items = run(state_url, body, queues=2)
    assert again is False and {i.lease_owner.split(":")[0] for i in items} == {"A", "B"}
    [(headers, raw)] = receiver.seen
    assert verify(SECRET, headers, raw) and not verify(b"another secret", headers, raw)
    assert headers["webhook-id"] == "b1:done"
    event = json.loads(raw)
    assert (event["type"], event["data"]) == ("batch.completed",
                                              {"id": "b1", "counts": zeros(succeeded=2)})


def test_no_webhook_without_a_url_or_before_the_end(state_url):
    fake = FakeRun({1: [Overloaded("full")]})

    async def body(q):
        await q.create(batch("quiet"), reqs(1))
        await q.create(batch("b1", T0 + 1, webhook_url="http://127.0.0.1:9/"), reqs(2))
        w = worker(q, fake, "w", webhooks=Webhooks(SECRET, ["http://127.0.0.1:9/"]),
                   clock=Clock(T0 + 10))
        await w.drain_once()  # quiet ends without a URL; b1 still has a retry pending
        return (await w.notify_if_done("quiet"), await w.notify_if_done("b1"),
                await w.notify_if_done("nope"), await q.notify_once("b1"))

    assert run(state_url, body) == (False, False, False, True)  # b1's flag still unset


def test_each_ended_batch_is_counted_once_with_its_missed_window(state_url):
    metrics = Recorder()

    async def body(q):
        await q.create(batch("ontime", completion_window_s=3600), reqs(1))
        await q.create(batch("late", T0 - 7200, completion_window_s=3600), reqs(2))
        await q.create(batch("stopped", T0 + 1), reqs(3))
        await q.cancel("stopped", now=T0 + 2)
        w = worker(q, FakeRun({}), "w", metrics=metrics, clock=Clock(T0 + 10))
        ran = await w.drain_once()
        other = worker(q, FakeRun({}), "other", metrics=metrics, clock=Clock(T0 + 10))
        return (ran, await w.notify_if_done("stopped"),
                [await other.notify_if_done(b) for b in ("ontime", "late", "stopped")])

    ran, stopped, again = run(state_url, body)
    assert ran == 3 and stopped is True and again == [False, False, False]
    ended = sorted((c[3]["state"], c[3]["late"]) for c in metrics.calls
                   if c[1] == "imagegen_batches_total")
    assert ended == [("cancelled", "false"), ("completed", "false"), ("completed", "true")]


def test_a_failed_manifest_write_is_retried_and_rewritten_after_a_replay(state_url,
                                                                        monkeypatch):
    monkeypatch.setattr("serve.batch.worker.END_RETRY_S", 0.05)
    written, fails, metrics = [], [2], Recorder()

    async def manifest(b) -> None:
        if fails[0]:
            fails[0] -= 1
            raise OSError("the store is down")
        written.append((b.id, dict(b.counts)))

    async def body(q):
        await q.create(batch("b1"), reqs(2))
        w = worker(q, FakeRun({1: [InvalidRequest("no")]}), "w", manifest=manifest,
                   concurrency=1, metrics=metrics)
        w.start()
        await until(lambda: written, "the manifest, after two failed writes")
        flagged_once = not await q.notify_once("b1")  # recorded after the write, not before
        await q.replay(["b1-000001"])
        await until(lambda: len(written) == 2, "the manifest after the replay")
        await w.stop()
        return flagged_once

    assert run(state_url, body) is True
    assert written == [("b1", zeros(succeeded=1, dead=1)), ("b1", zeros(succeeded=2))]
    ends = [c for c in metrics.calls if c[1] == "imagegen_batches_total"]
    assert len(ends) == 1  # counted once, though it ended twice


@pytest.mark.parametrize("swallow", ["answers", "raises"])
def test_stop_ends_the_loop_even_if_the_store_swallows_the_cancel(swallow):
    class Swallowing:  # what redis-py can do with a cancel that lands mid-command
        async def claim(self, *args, **kw):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallow == "raises":
                    raise StateUnavailable("the state store is unavailable") from None
            return []

    async def main():
        w = BatchWorker(Swallowing(), FakeRun(), name="w", poll_s=0.01)
        task = w.start()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(w.stop(), 2)
        return task.cancelled()

    assert asyncio.run(main())
