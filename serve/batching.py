"""Continuous batching for one pipeline per replica.

The next batch is formed when the pipeline becomes free, from every request that
queued while the last batch ran (up to `max_images`). A lone request starts at
once; under load batches fill by themselves.

Why not `@serve.batch`: Ray's batch loop forms the next batch as soon as it has
handed the current one off, before the concurrency semaphore, so with a zero
wait each batch freezes at the one or two requests queued at that instant (we
measured mean batch 1.3 at 32 clients, 0.17x of in-process throughput), and a
non-zero wait is paid by every lone request. Here composition is decided at the
last moment, which is what a busy accelerator wants.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from .engines.base import Generated, Job

Run = Callable[[list[Job]], Awaitable[list[np.ndarray]]]


@dataclass(slots=True)
class _Pending:
    jobs: list[Job]
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Queue requests (lists of jobs) and run them through `run` in batches.

    A request's jobs always run in the same batch; `max_images` caps how many
    images several requests may combine into (a larger request runs alone).
    """

    def __init__(self, run: Run, *, max_images: int, wait_s: float = 0.0) -> None:
        self._run = run
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.configure(max_images=max_images, wait_s=wait_s)

    def configure(self, *, max_images: int, wait_s: float) -> None:
        """Change batch size and wait live; takes effect from the next batch."""
        if max_images < 1 or wait_s < 0:
            raise ValueError(f"bad batching: max_images={max_images}, wait_s={wait_s}")
        self.max_images = max_images
        self.wait_s = wait_s

    @property
    def queued_images(self) -> int:
        return sum(len(p.jobs) for p in self._queue)

    async def submit(self, jobs: list[Job]) -> Generated:
        """Generate `jobs`; returns their images with queue and batch timings."""
        pending = _Pending(jobs, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="imagegen-batcher")
        return await pending.future

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._maybe_wait_for_company()
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _prune(self) -> None:
        """Forget callers that went away (cancelled): they neither run nor count."""
        if any(p.future.done() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.future.done())

    async def _maybe_wait_for_company(self) -> None:
        if self.wait_s <= 0:
            return
        while True:
            self._prune()
            if not self._queue or self.queued_images >= self.max_images:
                return
            left = self._queue[0].arrived + self.wait_s - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        images = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # the caller went away (cancelled)
                self._queue.popleft()
                continue
            if batch and images + len(head.jobs) > self.max_images:
                break
            batch.append(self._queue.popleft())
            images += len(head.jobs)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        jobs = [job for p in batch for job in p.jobs]
        start = time.perf_counter()
        try:
            images = await self._run(jobs)
        except Exception as e:  # noqa: BLE001 - every caller in the batch gets it
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        took = time.perf_counter() - start
        i = 0
        for p in batch:
            n = len(p.jobs)
            if not p.future.done():
                p.future.set_result(Generated(images[i : i + n], start - p.arrived, took, len(jobs)))
            i += n
