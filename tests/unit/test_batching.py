"""Batcher: composition of batches, waits, live config, cancellation, errors.

No Ray. Every test runs its own event loop with `asyncio.run`. The fake pipeline
records each batch's seeds and answers one 1x1 image per job holding the seed,
so each caller's images can be checked exactly. Ordering is made deterministic
by holding a batch on an `asyncio.Event`; timings are asserted only loosely.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serve.batching import PipelineBatcher
from serve.engines.base import Generated, Job

BLOCKER = 200  # seed of the request that holds the pipeline busy


def job(seed: int) -> Job:
    return Job("a cat", "", 64, 64, 4, 7.5, seed)


def jobs(*seeds: int) -> list[Job]:
    return [job(s) for s in seeds]


def seeds_of(result: Generated) -> list[int]:
    return [int(img[0, 0, 0]) for img in result.images]


class FakeRun:
    """The `run` coroutine: records batches, optionally waits, encodes seeds."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.hold = asyncio.Event()
        self.hold.set()  # open unless a test closes it
        self.entered = asyncio.Event()

    async def __call__(self, batch: list[Job]) -> list[np.ndarray]:
        self.batches.append([j.seed for j in batch])
        self.entered.set()
        await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_on is not None and any(j.seed == self.fail_on for j in batch):
            raise RuntimeError(f"pipeline failed on seed {self.fail_on}")
        return [np.full((1, 1, 3), j.seed % 256, np.uint8) for j in batch]


async def until(cond, timeout: float = 1.0) -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, "condition never became true"
        await asyncio.sleep(0)


async def busy(batcher: PipelineBatcher, run: FakeRun) -> asyncio.Task:
    """Start a one-job request and hold it inside `run` until run.hold is set."""
    run.hold.clear()
    task = asyncio.create_task(batcher.submit(jobs(BLOCKER)))
    await run.entered.wait()
    return task


async def queue_behind(batcher: PipelineBatcher, requests: list[list[int]]) -> list[asyncio.Task]:
    """Submit each request (a list of seeds) in order and wait until all are queued."""
    before = batcher.queued_images
    tasks = []
    for seeds in requests:
        tasks.append(asyncio.create_task(batcher.submit(jobs(*seeds))))
        await asyncio.sleep(0)  # let it reach the queue before the next one: FIFO
    await until(lambda: batcher.queued_images == before + sum(map(len, requests)))
    return tasks


def requests_of(sizes: list[int]) -> list[list[int]]:
    """Distinct consecutive seeds per request: sizes [2, 1] -> [[0, 1], [2]]."""
    out, n = [], 0
    for size in sizes:
        out.append(list(range(n, n + size)))
        n += size
    return out


# -- a lone request ---------------------------------------------------------


def test_lone_request_runs_at_once_as_its_own_batch():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8, wait_s=0.0)
        t0 = time.perf_counter()
        result = await batcher.submit(jobs(7, 3, 9))
        return run, result, time.perf_counter() - t0

    run, result, elapsed = asyncio.run(main())
    assert run.batches == [[7, 3, 9]]
    assert seeds_of(result) == [7, 3, 9]  # its own images, in its job order
    assert result.batch_images == 3
    assert 0 <= result.queue_s < 0.1
    assert elapsed < 0.2


def test_sequential_requests_are_not_held_back_for_each_other():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8)
        a = await batcher.submit(jobs(1))
        b = await batcher.submit(jobs(2, 3))
        return run, a, b

    run, a, b = asyncio.run(main())
    assert run.batches == [[1], [2, 3]]
    assert (seeds_of(a), a.batch_images) == ([1], 1)
    assert (seeds_of(b), b.batch_images) == ([2, 3], 2)


# -- combining while the pipeline is busy -----------------------------------


@pytest.mark.parametrize("n", [2, 5])
def test_requests_queued_while_busy_run_as_one_batch(n):
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[i] for i in range(n)])
        assert run.batches == [[BLOCKER]]  # nothing else ran while busy
        run.hold.set()
        return run, await first, await asyncio.gather(*tasks)

    run, first, results = asyncio.run(main())
    assert run.batches == [[BLOCKER], list(range(n))]  # ONE batch, not n
    assert seeds_of(first) == [BLOCKER] and first.batch_images == 1
    for i, r in enumerate(results):
        assert seeds_of(r) == [i]
        assert r.batch_images == n


# Request sizes queued behind a busy pipeline, max_images -> batches (in sizes).
PARTITIONS = [
    ([1, 1, 1], 8, [[1, 1, 1]]),
    ([1, 1, 1], 2, [[1, 1], [1]]),
    ([2, 2, 2], 4, [[2, 2], [2]]),
    ([3, 1], 4, [[3, 1]]),  # exactly max_images fits
    ([3, 2], 4, [[3], [2]]),  # never split a request to fill a batch
    ([1, 3, 1], 3, [[1], [3], [1]]),  # FIFO: the last 1 does not jump ahead
    ([1] * 5, 1, [[1]] * 5),
    ([5], 2, [[5]]),  # oversized runs alone, whole
    ([1, 5, 1], 2, [[1], [5], [1]]),
    ([5, 5], 4, [[5], [5]]),
]


@pytest.mark.parametrize(("sizes", "max_images", "expected"), PARTITIONS)
def test_max_images_caps_combining(sizes, max_images, expected):
    requests = requests_of(sizes)

    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=max_images)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, requests)
        run.hold.set()
        await first
        return run, await asyncio.gather(*tasks)

    run, results = asyncio.run(main())
    batches = run.batches[1:]
    assert [[len(r) for r in _split(b, requests)] for b in batches] == expected
    # FIFO overall, and every job of every request ran exactly once.
    assert [s for b in batches for s in b] == [s for r in requests for s in r]
    totals = {s: len(b) for b in batches for s in b}
    for req, res in zip(requests, results, strict=True):
        assert seeds_of(res) == req
        assert res.batch_images == totals[req[0]]


def _split(batch: list[int], requests: list[list[int]]) -> list[list[int]]:
    """The requests (by their seeds) that make up `batch`, asserting none is split."""
    parts = [r for r in requests if r[0] in batch]
    assert [s for r in parts for s in r] == batch
    return parts


def test_fifo_order_is_kept_across_batches():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=2)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[10], [11], [12], [13], [14]])
        run.hold.set()
        await first
        return run, await asyncio.gather(*tasks)

    run, results = asyncio.run(main())
    assert run.batches == [[BLOCKER], [10, 11], [12, 13], [14]]
    assert [seeds_of(r) for r in results] == [[10], [11], [12], [13], [14]]
    assert [r.batch_images for r in results] == [2, 2, 2, 2, 1]


# -- waiting for company -------------------------------------------------------


def test_wait_gathers_requests_arriving_within_the_window():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8, wait_s=0.2)
        a = asyncio.create_task(batcher.submit(jobs(1)))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(batcher.submit(jobs(2, 3)))
        return run, await a, await b

    run, a, b = asyncio.run(main())
    assert run.batches == [[1, 2, 3]]
    assert (seeds_of(a), seeds_of(b)) == ([1], [2, 3])
    assert a.batch_images == b.batch_images == 3
    assert a.queue_s > b.queue_s >= 0  # a arrived first, same batch start


def test_lone_request_waits_about_wait_s_and_no_more():
    wait_s = 0.1

    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8, wait_s=wait_s)
        t0 = time.perf_counter()
        result = await batcher.submit(jobs(5))
        return run, result, time.perf_counter() - t0

    run, result, elapsed = asyncio.run(main())
    assert run.batches == [[5]]
    assert result.queue_s >= wait_s * 0.5  # it did wait for company
    assert elapsed < wait_s + 0.2


def test_wait_ends_early_once_max_images_are_queued():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=3, wait_s=5.0)
        t0 = time.perf_counter()
        results = await asyncio.gather(batcher.submit(jobs(1)), batcher.submit(jobs(2, 3)))
        return run, results, time.perf_counter() - t0

    run, results, elapsed = asyncio.run(main())
    assert run.batches == [[1, 2, 3]]
    assert [seeds_of(r) for r in results] == [[1], [2, 3]]
    assert elapsed < 1.0  # far less than wait_s


def test_requests_queued_while_busy_do_not_wait_again():
    # Their window opened when they arrived; by the time the pipeline is free
    # it has passed, so the next batch starts at once.
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8, wait_s=0.1)
        first = await busy(batcher, run)  # waits 0.1 s for company, then holds
        tasks = await queue_behind(batcher, [[1], [2]])
        await asyncio.sleep(0.15)
        run.hold.set()
        await first
        t0 = time.perf_counter()
        results = await asyncio.gather(*tasks)
        return run, results, time.perf_counter() - t0

    run, results, elapsed = asyncio.run(main())
    assert run.batches == [[BLOCKER], [1, 2]]
    assert [seeds_of(r) for r in results] == [[1], [2]]
    assert elapsed < 0.08


# -- configure ----------------------------------------------------------------


def test_configure_takes_effect_from_the_next_batch():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[1], [2], [3], [4]])
        batcher.configure(max_images=2, wait_s=0.0)
        run.hold.set()
        await first
        await asyncio.gather(*tasks)
        batcher.configure(max_images=8, wait_s=0.1)
        t0 = time.perf_counter()
        lone = await batcher.submit(jobs(5))
        return run, lone, time.perf_counter() - t0

    run, lone, elapsed = asyncio.run(main())
    assert run.batches == [[BLOCKER], [1, 2], [3, 4], [5]]
    assert lone.queue_s >= 0.05  # the new wait applies
    assert elapsed < 0.3


BAD_CONFIGS = [(0, 0.0), (-1, 0.0), (1, -0.001), (0, -1.0)]


@pytest.mark.parametrize(("max_images", "wait_s"), BAD_CONFIGS)
def test_configure_rejects_bad_values_and_keeps_the_old_ones(max_images, wait_s):
    batcher = PipelineBatcher(FakeRun(), max_images=4, wait_s=0.05)
    with pytest.raises(ValueError, match=f"max_images={max_images}"):
        batcher.configure(max_images=max_images, wait_s=wait_s)
    assert (batcher.max_images, batcher.wait_s) == (4, 0.05)


@pytest.mark.parametrize(("max_images", "wait_s"), BAD_CONFIGS)
def test_constructor_rejects_bad_values(max_images, wait_s):
    with pytest.raises(ValueError):
        PipelineBatcher(FakeRun(), max_images=max_images, wait_s=wait_s)


@pytest.mark.parametrize(("max_images", "wait_s"), [(1, 0.0), (64, 2.5)])
def test_configure_accepts_edge_values(max_images, wait_s):
    batcher = PipelineBatcher(FakeRun(), max_images=4)
    batcher.configure(max_images=max_images, wait_s=wait_s)
    assert (batcher.max_images, batcher.wait_s) == (max_images, wait_s)


# -- cancellation -------------------------------------------------------------


def test_cancelled_caller_is_skipped():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8)
        first = await busy(batcher, run)
        a, b, c = await queue_behind(batcher, [[1], [2, 3], [4]])
        b.cancel()
        run.hold.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await b
        return run, await a, await c

    run, a, c = asyncio.run(main())
    assert run.batches == [[BLOCKER], [1, 4]]
    assert (seeds_of(a), seeds_of(c)) == ([1], [4])
    assert a.batch_images == c.batch_images == 2


def test_caller_cancelled_mid_batch_does_not_break_the_others():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=8)
        run.hold.clear()
        a = asyncio.create_task(batcher.submit(jobs(1)))
        b = asyncio.create_task(batcher.submit(jobs(2)))
        await run.entered.wait()
        assert run.batches == [[1, 2]]  # both inside run
        a.cancel()
        run.hold.set()
        with pytest.raises(asyncio.CancelledError):
            await a
        return run, await b, await batcher.submit(jobs(3))

    run, b, later = asyncio.run(main())
    assert run.batches == [[1, 2], [3]]
    assert seeds_of(b) == [2] and b.batch_images == 2
    assert seeds_of(later) == [3]


def test_cancelled_request_does_not_count_toward_max_images_while_waiting():
    async def main():
        run = FakeRun()
        batcher = PipelineBatcher(run, max_images=2, wait_s=0.25)
        gone = asyncio.create_task(batcher.submit(jobs(1)))
        await asyncio.sleep(0)
        gone.cancel()
        b = asyncio.create_task(batcher.submit(jobs(2)))
        await asyncio.sleep(0.05)  # well inside b's window
        c = asyncio.create_task(batcher.submit(jobs(3)))
        return run, await b, await c

    run, b, c = asyncio.run(main())
    assert run.batches == [[2, 3]]
    assert b.batch_images == c.batch_images == 2


# -- errors -------------------------------------------------------------------


def test_exception_reaches_every_caller_of_the_batch_and_serving_goes_on():
    async def main():
        run = FakeRun(fail_on=2)
        batcher = PipelineBatcher(run, max_images=8)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[1], [2, 3], [4]])
        run.hold.set()
        await first
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return run, outcomes, await batcher.submit(jobs(5, 6))

    run, outcomes, later = asyncio.run(main())
    assert run.batches == [[BLOCKER], [1, 2, 3, 4], [5, 6]]
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert outcomes[0] is outcomes[1] is outcomes[2]  # the same exception
    assert "seed 2" in str(outcomes[0])
    assert seeds_of(later) == [5, 6] and later.batch_images == 2


def test_exception_does_not_leak_into_other_batches():
    async def main():
        run = FakeRun(fail_on=3)
        batcher = PipelineBatcher(run, max_images=2)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[1], [2], [3], [4], [5]])
        run.hold.set()
        await first
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert [type(o) for o in outcomes] == [
        Generated,
        Generated,
        RuntimeError,
        RuntimeError,
        Generated,
    ]
    assert seeds_of(outcomes[4]) == [5]


# -- timings ------------------------------------------------------------------


def test_queue_generate_and_batch_timings():
    async def main():
        run = FakeRun(delay=0.03)
        batcher = PipelineBatcher(run, max_images=8)
        first = await busy(batcher, run)
        tasks = await queue_behind(batcher, [[1, 2], [3]])
        await asyncio.sleep(0.05)
        run.hold.set()
        return await first, await asyncio.gather(*tasks)

    first, (a, b) = asyncio.run(main())
    assert 0 <= first.queue_s < 0.05  # it found the pipeline free
    assert first.batch_images == 1
    assert first.generate_s >= 0.07  # held 0.05 s, then delay 0.03 s
    # Queued behind a batch that took >= 0.08 s, and the batch they share took >= 0.03 s.
    assert a.queue_s >= 0.07 and b.queue_s >= 0.07
    assert a.generate_s == b.generate_s >= 0.025
    assert a.batch_images == b.batch_images == 3
    assert (seeds_of(a), seeds_of(b)) == ([1, 2], [3])
