"""The generic Batcher's own contract: concurrency slots, per-item results and
errors, the queue bound. (The pipeline-side contract is in test_batching.py.)"""

from __future__ import annotations

import asyncio

import pytest

from serve.batching import Batcher, QueueFull


class Gate:
    """A `run` that records each batch and blocks until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.running = 0
        self.peak = 0

    async def __call__(self, items: list[int]) -> list[object]:
        self.batches.append(list(items))
        self.running += 1
        self.peak = max(self.peak, self.running)
        await self.release.wait()
        self.running -= 1
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(("max_concurrent", "started_before_release"), [
    (1, [[0]]),  # the second batch is composed only once the first has finished
    (2, [[0], [2, 4]]),
])
def test_up_to_max_concurrent_batches_run_at_once(max_concurrent, started_before_release):
    async def main():
        gate = Gate()
        b = Batcher(gate, max_size=2, max_concurrent=max_concurrent)
        first = asyncio.create_task(b.submit(0))
        await settle()
        rest = [asyncio.create_task(b.submit(i)) for i in range(2, 12, 2)]
        await settle()
        before = [list(x) for x in gate.batches]
        gate.release.set()
        return gate, before, await asyncio.gather(first, *rest)

    gate, before, results = asyncio.run(main())
    assert before == started_before_release
    assert gate.batches == [[0], [2, 4], [6, 8], [10]]
    assert results == [0, 20, 40, 60, 80, 100]
    assert gate.peak == max_concurrent


def test_exception_results_reach_only_their_caller():
    async def main():
        gate = Gate()
        gate.release.set()
        b = Batcher(gate, max_size=8)
        return await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)

    results = asyncio.run(main())
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError) and str(results[1]) == "odd 1"
    assert isinstance(results[3], ValueError) and str(results[3]) == "odd 3"


def test_queue_bound_refuses_and_recovers():
    async def main():
        gate = Gate()
        b = Batcher(gate, max_size=1, max_queued=2)
        first = asyncio.create_task(b.submit(0))  # runs, holds the only slot
        await settle()
        queued = [asyncio.create_task(b.submit(i)) for i in (2, 4)]
        await settle()
        with pytest.raises(QueueFull):
            await b.submit(6)
        gate.release.set()
        done = await asyncio.gather(first, *queued)
        return done, await b.submit(8)

    done, later = asyncio.run(main())
    assert done == [0, 20, 40] and later == 80


def test_wrong_result_count_fails_the_batch_instead_of_hanging():
    async def short(items):
        return items[:-1]

    async def main():
        b = Batcher(short, max_size=4)
        return await asyncio.wait_for(
            asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True), 2
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="max_concurrent"):
        Batcher(Gate(), max_size=1, max_concurrent=0)
    with pytest.raises(ValueError, match="max_size=0"):
        Batcher(Gate(), max_size=0)


def test_a_batch_all_of_whose_callers_left_is_cancelled_and_frees_its_slot():
    async def main():
        cancelled = []

        async def run(items):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(items)
                raise
            return items

        b = Batcher(run, max_size=2, max_concurrent=1)
        a, c = asyncio.create_task(b.submit(1)), asyncio.create_task(b.submit(2))
        await settle()
        a.cancel()
        await settle()
        assert cancelled == []  # one caller is still waiting: the batch runs on
        c.cancel()
        await settle()
        assert cancelled == [[1, 2]]
        b._run = Gate()
        b._run.release.set()
        return await asyncio.wait_for(b.submit(4), 2)  # the slot came back

    assert asyncio.run(main()) == 40


def test_one_caller_leaving_keeps_the_others_results():
    async def main():
        gate = Gate()
        b = Batcher(gate, max_size=3)
        tasks = [asyncio.create_task(b.submit(i)) for i in (0, 2, 4)]
        await settle()
        tasks[1].cancel()
        gate.release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    a, gone, c = asyncio.run(main())
    assert (a, c) == (0, 40) and isinstance(gone, asyncio.CancelledError)


def test_a_run_cancelled_from_elsewhere_answers_its_callers_with_a_retryable_error():
    from serve.errors import ModelUnavailable

    async def run(items):
        raise asyncio.CancelledError  # as Ray raises when the replica's call is cancelled

    async def main():
        b = Batcher(run, max_size=2)
        return await asyncio.wait_for(
            asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True), 2)

    assert all(isinstance(r, ModelUnavailable) for r in asyncio.run(main()))


def test_past_max_partial_running_batches_a_batch_leaves_only_full_or_after_one_ends():
    """Two slots, one partial: with one batch running, a lone straggler waits for
    company (not sent at once to take the second slot), a full batch leaves at once,
    and the straggler leaves as soon as a running batch ends."""
    async def main():
        gate = Gate()
        b = Batcher(gate, max_size=2, max_concurrent=2, max_partial=1)
        first = asyncio.create_task(b.submit(0))
        await settle()
        lone = asyncio.create_task(b.submit(2))
        await settle()
        held = [list(x) for x in gate.batches]
        company = asyncio.create_task(b.submit(4))
        await settle()
        full = [list(x) for x in gate.batches]
        straggler = asyncio.create_task(b.submit(6))
        await settle()
        before_end = [list(x) for x in gate.batches]
        gate.release.set()
        results = await asyncio.gather(first, lone, company, straggler)
        return held, full, before_end, gate.batches, results

    held, full, before_end, batches, results = asyncio.run(main())
    assert held == [[0]]  # the lone item did not take the free slot
    assert full == [[0], [2, 4]]  # a full batch leaves beside the running one
    assert before_end == [[0], [2, 4]]  # both slots taken: the straggler queues
    assert batches == [[0], [2, 4], [6]] and results == [0, 20, 40, 60]


def test_max_partial_must_lie_within_the_slots():
    with pytest.raises(ValueError, match="max_partial"):
        Batcher(Gate(), max_size=2, max_concurrent=2, max_partial=3)


def test_a_queue_bound_below_a_full_batch_does_not_hold_free_slots():
    """With at most 1 request queued and batches of 4, the queue is as full as it
    gets: the held batch leaves beside the running one instead of refusing the next
    request while a slot sits free."""
    async def main():
        gate = Gate()
        b = Batcher(gate, max_size=4, max_concurrent=2, max_partial=1, max_queued=1)
        first = asyncio.create_task(b.submit(0))
        await settle()
        second = asyncio.create_task(b.submit(2))
        await settle()
        third = asyncio.create_task(b.submit(4))  # queued: refused if [2] were held
        await settle()
        gate.release.set()
        return gate.batches, await asyncio.gather(first, second, third)

    batches, results = asyncio.run(main())
    assert batches == [[0], [2], [4]] and results == [0, 20, 40]
