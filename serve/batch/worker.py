"""The batch worker: claims items from the queue (queue.py) on a lease, runs each
through the service's generate, and records the outcome: the result, a retry after a
backoff with full jitter, or the dead-letter queue. When an item ends its batch, the
batch's webhook is sent once (the queue's `notify_once`), in the background.

Many workers may share one queue, on one host or many; the queue's leases keep an
item to one of them. A worker that dies leaves its leases to expire: another claims
them (the queue counts that as a failed attempt) and the dead worker's late
`complete`, if it ever comes, is refused.

Batch yields to interactive traffic: while `busy()` says so, nothing new is claimed
(items in flight run on).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from ..errors import (
    GenerationFailed,
    ImagegenError,
    ImageSafetyUnavailable,
    ModelUnavailable,
    QuotaExceeded,
    RateLimited,
    StateUnavailable,
    StorageUnavailable,
    TierDisabled,
)
from .queue import Batch, BatchQueue, Item
from .webhooks import Webhooks, backoff

log = logging.getLogger("imagegen.batch")
END_RETRY_S = 5.0  # how often a batch end whose manifest write failed is tried again

# Errors worth another attempt later: the service could not serve now. Any other
# ImagegenError is the request's own fault (4xx) and would fail the same way again.
RETRYABLE: tuple[type[ImagegenError], ...] = (
    ModelUnavailable, GenerationFailed, QuotaExceeded, RateLimited, StateUnavailable,
    StorageUnavailable, ImageSafetyUnavailable, TierDisabled)


def retryable(err: Exception) -> bool:
    """Whether an item that raised `err` is tried again. Anything that is no
    ImagegenError (a timeout, an OSError, a replica's death as a RuntimeError) is."""
    return not isinstance(err, ImagegenError) or isinstance(err, RETRYABLE)


def _raise_if_cancelling() -> None:
    # Called where an error is caught. redis-py can turn a cancellation mid-command
    # into a ConnectionError (so StateUnavailable): caught as an error, it would keep a
    # stopped worker running. A task being cancelled ends as cancelled.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def describe(err: Exception) -> str:
    """The item's last_error: `code: message`."""
    if isinstance(err, ImagegenError):
        return f"{err.code}: {err.message}"
    text = str(err)
    return f"internal: {type(err).__name__}" + (f": {text}" if text else "")


class BatchWorker:
    """Runs batch items from `queue` through `run` (the service's generate for one item:
    it returns the result dict to record and raises on failure).

    `attempts` bounds the attempts of an item (an expired lease counts as one); a
    retry waits max(the error's retry_after_s, backoff with full jitter from
    `base_delay_s`, capped at `max_delay_s`). `clock` stamps every queue call and
    `sleep` does every wait (the poll and the heartbeat), so tests can move time."""

    def __init__(self, queue: BatchQueue, run: Callable[[Item], Awaitable[dict]], *,
                 name: str, lease_s: float = 60, concurrency: int = 2, attempts: int = 5,
                 base_delay_s: float = 1.0, max_delay_s: float = 60.0, poll_s: float = 0.5,
                 busy: Callable[[], bool] = lambda: False, webhooks: Webhooks | None = None,
                 manifest: Callable[[Batch], Awaitable[object]] | None = None, metrics=None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if not (lease_s > 0 and concurrency >= 1 and attempts >= 1 and base_delay_s >= 0
                and max_delay_s >= 0 and poll_s > 0):
            raise ValueError(f"batch worker settings out of range: lease_s={lease_s}, "
                             f"concurrency={concurrency}, attempts={attempts}, "
                             f"base_delay_s={base_delay_s}, max_delay_s={max_delay_s}, "
                             f"poll_s={poll_s}")
        self.queue = queue
        self.name = name
        self.lease_s = lease_s
        self.concurrency = concurrency
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.poll_s = poll_s
        self._run = run
        self._busy = busy
        self._webhooks = webhooks
        self._manifest = manifest
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        self._task: asyncio.Task | None = None
        self._graceful = False  # stop() is ending the loop: items in flight run on
        self._items: set[asyncio.Task] = set()
        self._notifying: set[asyncio.Task] = set()
        self._unrecorded: set[str] = set()  # ended batches whose manifest write failed
        self._retry_ends_at = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._items)

    # -- the loop ---------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        """run_forever as a task of the running loop (one per worker)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run_forever(), name=f"batch-{self.name}")
        return self._task

    async def run_forever(self) -> None:
        """Claim and run items until cancelled; cancelling it cancels the items in
        flight too (unless `stop` is giving them a grace period)."""
        try:
            await self._loop()
        finally:
            if not self._graceful:
                for t in self._items:
                    t.cancel()

    async def _loop(self) -> None:
        while True:
            # redis-py may also swallow a cancellation whole (the command answers): a
            # stopped loop must not claim again.
            _raise_if_cancelling()
            if self._unrecorded and time.monotonic() >= self._retry_ends_at:
                await self._record_ends()
            if self._busy():
                await self._sleep(self.poll_s)
                continue
            free = self.concurrency - len(self._items)
            if free <= 0:
                await asyncio.wait(self._items, return_when=asyncio.FIRST_COMPLETED)
                continue
            claimed = await self._claim(free)
            for item in claimed:
                self._spawn(item)
            if not claimed:
                await self._sleep(self.poll_s)

    async def stop(self, *, grace_s: float = 0.0) -> None:
        """Stop claiming; give items in flight and webhooks being sent up to `grace_s`
        to finish, then cancel them. A cancelled item's lease is left to expire (as if
        the worker died): another worker claims it then."""
        self._graceful = True
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        finally:
            self._graceful = False
        deadline = time.monotonic() + grace_s
        # Items first: one that ends its batch starts a webhook, which the grace covers.
        for tasks in (self._items, self._notifying):
            while tasks and (left := deadline - time.monotonic()) > 0:
                await asyncio.wait(set(tasks), timeout=left)
        pending = self._items | self._notifying
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def drain_once(self) -> int:
        """Claim and run what is claimable now, `concurrency` at a time, until nothing
        is; how many items were run. Yields to `busy()` as the loop does (returns 0)."""
        done = 0
        while not self._busy():
            claimed = await self._claim(self.concurrency)
            if not claimed:
                break
            await asyncio.gather(*(self._process(item) for item in claimed))
            done += len(claimed)
        # The webhooks were started in the background; drain_once does not wait for them.
        return done

    async def _claim(self, limit: int) -> list[Item]:
        try:
            return await self.queue.claim(self.name, self.lease_s, limit, now=self._clock())
        except Exception:  # the store is down: try again next poll, never die of it
            _raise_if_cancelling()
            log.exception("batch worker %s: claim failed", self.name)
            return []

    def _spawn(self, item: Item) -> None:
        task = asyncio.create_task(self._process(item), name=f"batch-item-{item.id}")
        self._items.add(task)
        task.add_done_callback(self._items.discard)

    # -- one item -------------------------------------------------------------------

    async def _process(self, item: Item) -> None:
        t0 = time.perf_counter()
        try:
            outcome = await self._attempt(item)
        except asyncio.CancelledError:
            raise  # the worker stops: the lease expires and another worker claims it
        except Exception:  # a store call failed: the lease expires, the item comes back
            _raise_if_cancelling()
            log.exception("batch worker %s: item %s not recorded", self.name, item.id)
            return
        self._record("inc", "imagegen_batch_items_total", 1, outcome=outcome)
        self._record("observe", "imagegen_batch_item_seconds", time.perf_counter() - t0)
        if outcome == "dead":
            self._record("inc", "imagegen_dead_letters_total", 1, queue="batch")
        if outcome != "retried":
            try:
                await self.notify_if_done(item.batch_id)
            except Exception:
                _raise_if_cancelling()
                log.exception("batch worker %s: batch %s not notified", self.name,
                              item.batch_id)

    async def _attempt(self, item: Item) -> str:
        """Run the item and record its outcome: succeeded, retried, dead, cancelled
        (its batch was, meanwhile) or lost (its lease was taken: nothing recorded)."""
        try:
            result = await self._run_leased(item)
        except Exception as e:  # noqa: BLE001 - any failure is an outcome (retryable())
            _raise_if_cancelling()
            return await self._failed(item, e)
        ok = await self.queue.complete(item.id, item.lease_owner, result, now=self._clock())
        return "succeeded" if ok else "lost"

    async def _run_leased(self, item: Item) -> dict:
        beat = asyncio.create_task(self._heartbeat(item))
        try:
            return await self._run(item)
        finally:
            beat.cancel()

    async def _failed(self, item: Item, err: Exception) -> str:
        now = self._clock()
        retry_at = None
        if retryable(err) and item.attempts + 1 < self.attempts:
            retry_at = now + self._delay(item.attempts, err)
        state = await self.queue.fail(item.id, item.lease_owner, describe(err), retry_at,
                                      now=now)
        log.log(logging.WARNING if state == "dead" else logging.INFO,
                "batch item %s attempt %d: %s -> %s", item.id, item.attempts + 1,
                describe(err), state or "lease lost")
        return {"pending": "retried", "dead": "dead", "cancelled": "cancelled"}.get(
            state or "", "lost")

    def _delay(self, failures: int, err: Exception) -> float:
        # `failures` before this one: 0 after the first, the backoff's first step.
        floor = getattr(err, "retry_after_s", None) or 0
        return max(float(floor), backoff(failures, self.base_delay_s, self.max_delay_s,
                                         self._rng))

    async def _heartbeat(self, item: Item) -> None:
        while True:
            await self._sleep(self.lease_s / 3)
            try:
                if not await self.queue.renew(item.id, item.lease_owner, self.lease_s,
                                              now=self._clock()):
                    # Taken by another worker after a stall: this run's result will be
                    # refused; let it finish rather than kill a generation mid-step.
                    log.warning("batch item %s: lease %s lost", item.id, item.lease_owner)
                    return
            except Exception:
                _raise_if_cancelling()
                log.exception("batch item %s: renew failed", item.id)

    def _record(self, method: str, name: str, value: float, **labels: str) -> None:
        if self._metrics is None:
            return
        try:
            getattr(self._metrics, method)(name, value, **labels)
        except Exception:  # a metric never fails an item (e.g. not yet in the catalogue)
            log.exception("batch worker %s: metric %s", self.name, name)

    # -- the end of a batch ----------------------------------------------------------

    async def _record_ends(self) -> None:
        """Try again to record the ends whose manifest write failed (every
        `END_RETRY_S`); one that still fails stays for the next try."""
        self._retry_ends_at = time.monotonic() + END_RETRY_S
        for batch_id in list(self._unrecorded):
            try:
                await self.notify_if_done(batch_id)
            except Exception:
                _raise_if_cancelling()
                log.exception("batch %s: end not recorded", batch_id)

    async def notify_if_done(self, batch_id: str) -> bool:
        """Record the batch's end, if it has ended (nothing pending or leased): its
        results manifest (`manifest`, written again when it ends again after a replay),
        then once: `imagegen_batches_total` by state and whether it missed its
        completion window, and its webhook (`batch.completed` or `batch.cancelled`, data
        {id, counts}) if it has a webhook_url, started and never waited for. True if
        this call recorded it. The worker calls it when an item ends; a cancel that left
        nothing in flight should call it too."""
        batch = await self.queue.get(batch_id)
        if (batch is None or batch.state == "running"
                or batch.counts.get("pending") or batch.counts.get("leased")):
            return False
        if self._manifest is not None:
            try:  # before the flag: an idempotent write, so a failed one is retried
                await self._manifest(batch)
            except Exception:
                _raise_if_cancelling()
                log.exception("batch %s: results manifest not written; retrying", batch_id)
                self._unrecorded.add(batch_id)  # the loop tries again (its end unflagged)
                return False
        self._unrecorded.discard(batch_id)
        # Hazard: the flag is set before the delivery, so a worker dying in between
        # loses the webhook (at most once); the other order would send it twice.
        if not await self.queue.notify_once(batch_id):
            return False
        late = self._clock() > batch.created + batch.completion_window_s
        self._record("inc", "imagegen_batches_total", 1, state=batch.state,
                     late="true" if late else "false")
        if late:
            log.warning("batch %s ended %s past its completion window of %d s", batch.id,
                        _took(self._clock() - batch.created - batch.completion_window_s),
                        batch.completion_window_s)
        if self._webhooks is not None and batch.webhook_url:
            task = asyncio.create_task(self._webhooks.send(
                batch.webhook_url, f"batch.{batch.state}",
                {"id": batch.id, "counts": dict(batch.counts)}, msg_id=f"{batch.id}:done"))
            self._notifying.add(task)
            task.add_done_callback(self._notifying.discard)
        return True


async def report_depth(queue: BatchQueue, metrics, every_s: float = 15.0) -> None:
    """Set `imagegen_batch_queue_depth` from the queue every `every_s`, until cancelled;
    a store that is down skips a round."""
    while True:
        try:
            for state, n in (await queue.depth()).items():
                metrics.set("imagegen_batch_queue_depth", n, state=state)
        except Exception:  # the next round tries again
            _raise_if_cancelling()
            log.warning("batch queue depth not read", exc_info=True)
        await asyncio.sleep(every_s)


def _took(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
