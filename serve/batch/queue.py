"""The batch queue: a batch is N generation items, each processed by a worker that
holds it on a lease and may die. Durable in the state store (SQLite or Redis,
queue_stores.py), one contract over both (tests/unit/test_batch_queue_contract.py).

An item's life:

    pending --claim--> leased --complete--> succeeded
       ^                  |  \\--fail(retry_at)--> pending (attempts+1, not_before)
       |                  |   \\--fail(None)-----> dead (the dead-letter queue)
       |                  \\--lease expired, claimed again (attempts+1)--> leased
       +----replay-------- dead --purge--> purged
    pending --cancel--> cancelled

Choices the contract fixes:

- Order: oldest first by `not_before`, then by item id (`<batch>-<index>`): FIFO by
  batch creation (a pending item's `not_before` starts at its batch's `created`),
  items of a batch in index order. Expired leases (a dead worker's items) are taken
  before pending ones. One long batch delays a later one: fairness between
  principals is the admission's job (quotas), not the queue's.
- A lease is `worker:token`, fresh per claim. Only the lease's holder completes,
  fails or renews the item; an expired lease still holds until another claim takes
  it (the work may be done: nobody else has it). A repeated `complete` or `fail` by
  the lease that already ended the item answers as the first did and changes
  nothing (a call retried after a lost reply), so a result is recorded exactly once.
- A reclaimed lease counts as a failed attempt (attempts+1, last_error "lease
  expired"), so a worker can dead-letter an item that keeps killing its workers.
- Cancel: pending items become cancelled; leased ones run on, and their `complete`
  still records succeeded (the work was done and paid for; dropping it helps no one),
  while their `fail` with a retry, or their lease expiring, ends them cancelled, not
  pending. `fail` without a retry still dead-letters (the error is kept for admins).
  Cancelling a batch with nothing pending or leased changes nothing (it stays
  completed). `replay` skips a cancelled batch's items.
- Purge keeps a tombstone: the item's state becomes "purged" (it leaves the DLQ and
  `depth`), so a batch's counts still sum to the items it was created with.
- A batch's state is computed on read: "cancelled" once cancelled, else "completed"
  when no item is pending or leased, else "running".
- `notify_once` is a flag set once per batch, never cleared: a batch that completes,
  has dead items replayed and completes again is not notified again.
- Time is the caller's clock (`now`, default time.time()): leases are long beside the
  skew between hosts; tests pass `now` to move time without sleeping.
"""

from __future__ import annotations

from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

BatchState = Literal["running", "cancelled", "completed"]
ItemState = Literal["pending", "leased", "succeeded", "dead", "cancelled", "purged"]
ITEM_STATES: tuple[ItemState, ...] = ("pending", "leased", "succeeded", "dead", "cancelled",
                                      "purged")
# No "-" (an item id is "<batch id>-<index>"), no leading "." (its manifest's key)
BATCH_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,63}$"


def item_id(batch_id: str, index: int) -> str:
    # Zero-padded: ids of one batch sort by index, the tie-break of the claim order.
    return f"{batch_id}-{index:06d}"


class Batch(BaseModel):
    """A batch as stored; `state` and `counts` are computed on read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=BATCH_ID)] = Field(description="the caller's id")
    principal: str = Field(description="who submitted it")
    created: float = Field(description="unix time of submission")
    completion_window_s: Annotated[float, Field(gt=0)] = Field(
        86400.0, description="how long the caller allows for it")
    webhook_url: str | None = Field(None, description="called when it ends")
    state: BatchState = Field("running", description="computed on read")
    counts: dict[ItemState, int] = Field(default_factory=dict,
                                         description="items by state, computed on read")


class Item(BaseModel):
    """One generation request of a batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="<batch id>-<index, 6 digits>")
    batch_id: str
    index: Annotated[int, Field(ge=0)]
    request: dict = Field(description="the generation request's JSON")
    state: ItemState
    attempts: Annotated[int, Field(ge=0)] = Field(
        0, description="attempts that ended without success: fails, expired leases")
    not_before: float = Field(description="unix time before which it is not claimed")
    last_error: str | None = None
    result: dict | None = Field(None, description="what the succeeding lease recorded")
    lease_owner: str | None = Field(None, description="worker:token of the current "
                                    "lease, or of the last one once it ended")
    lease_until: float | None = Field(None, description="while leased only")
    updated: float = Field(description="unix time of its last change")


def counted(counts: dict[str, int]) -> dict[ItemState, int]:
    return {s: int(counts.get(s, 0)) for s in ITEM_STATES}


def batch_state(stored: str, counts: dict[str, int]) -> BatchState:
    if stored == "cancelled":
        return "cancelled"
    return "running" if counts.get("pending", 0) or counts.get("leased", 0) else "completed"


class BatchQueue(Protocol):
    async def create(self, batch: Batch, requests: list[dict]) -> list[str]:
        """Store the batch and one pending item per request, all or nothing; the item
        ids by index. A batch id that exists is kept as it is (a retried create)."""
        ...

    async def get(self, batch_id: str) -> Batch | None: ...

    async def list(self, principal: str, limit: int = 100) -> list[Batch]:
        """The principal's batches, newest first."""
        ...

    async def items(self, batch_id: str, state: ItemState | None = None) -> list[Item]:
        """By index."""
        ...

    async def claim(self, worker: str, lease_s: float, limit: int,
                    now: float | None = None) -> list[Item]:
        """Lease up to `limit` items to `worker` until now + lease_s: expired leases
        first, then pending items due by now, oldest first. Never one item to two."""
        ...

    async def complete(self, item_id: str, lease_owner: str, result: dict, *,
                       now: float | None = None) -> bool:
        """Record the result if `lease_owner` holds the lease; False if it was lost."""
        ...

    async def fail(self, item_id: str, lease_owner: str, error: str,
                   retry_at: float | None, *, now: float | None = None) -> ItemState | None:
        """Back to pending until `retry_at`, or dead (None); the new state, None if the
        lease was lost."""
        ...

    async def renew(self, item_id: str, lease_owner: str, lease_s: float, *,
                    now: float | None = None) -> bool:
        """Extend the lease to now + lease_s (a heartbeat); False if it was lost."""
        ...

    async def cancel(self, batch_id: str, *, now: float | None = None) -> int:
        """Cancel the batch's pending items; how many."""
        ...

    async def notify_once(self, batch_id: str) -> bool:
        """True for the first caller only, ever, per batch (False for a batch that does
        not exist): whoever gets True sends the batch's completion webhook, so it goes
        once even when two workers finish its last items together."""
        ...

    async def dead(self, limit: int = 100) -> list[Item]:
        """The dead-letter queue across batches, oldest death first."""
        ...

    async def replay(self, item_ids: list[str], *, now: float | None = None) -> int:
        """Dead items back to pending now, attempts reset; how many."""
        ...

    async def purge(self, item_ids: list[str], *, now: float | None = None) -> int:
        """Dead items out of the DLQ, to state "purged"; how many."""
        ...

    async def depth(self, *, now: float | None = None) -> dict[str, int]:
        """Items across all batches (metrics): "pending" (due: claimable now),
        "waiting" (pending, not due before a retry's or a future batch's time),
        "leased", "dead"."""
        ...

    async def close(self) -> None: ...


def open_queue(state_url: str) -> BatchQueue:
    from ..quotas.keys import sqlite_path, state_backend

    if state_backend(state_url) == "sqlite":
        from .queue_stores import SQLiteQueue

        return SQLiteQueue(sqlite_path(state_url))
    from .queue_stores import RedisQueue

    return RedisQueue(state_url)
