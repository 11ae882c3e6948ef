"""Batch jobs as callers see them: submit (every item checked now, as a request
would be: its template, the prompt policy, the plan's limits; a bad one refuses the
batch naming its index), status, the caller's list, cancel, results. Items run later
through the same service path (worker.py), each under an Idempotency-Key of its item
id and with its seed drawn now, so a retried item is charged once and lands on the
same recipe."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ImagegenError, InvalidRequest, MalformedBody, NotFound
from ..quotas.principals import Principal
from ..schemas import MAX_SEED, GenerateRequest, load_json, validate
from .queue import BATCH_ID, Batch, BatchQueue, Item, ItemState


class BatchCreate(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: Annotated[str, Field(pattern=BATCH_ID)] | None = Field(
        None, description="your id for it (a resubmission with the same id is the same "
        "batch); drawn when absent")
    requests: list[dict[str, Any]] = Field(min_length=1, description="generation requests, "
                                           "as POST /v1/images takes them")
    completion_window_s: Annotated[int, Field(ge=60, le=7 * 86400)] = Field(
        86400, description="how long you allow for it (misses are counted)")
    webhook_url: Annotated[str, Field(max_length=2048)] | None = Field(
        None, description="called (signed, Standard Webhooks) when it ends; must be on the "
        "webhook allowlist")


JSONL_TYPES = ("application/jsonl", "application/x-ndjson")
JSONL_OPTIONS = ("id", "completion_window_s", "webhook_url")  # query parameters with JSONL


def batch_body_limit(max_body_bytes: int) -> int:
    """A batch body holds many requests: 32 requests' worth (2 MiB by default), at most
    32 MiB whatever max_body_bytes says (it is parsed on the ingress's event loop)."""
    return min(max_body_bytes * 32, 32 << 20)


def from_jsonl(raw: bytes, options: dict[str, Any], max_items: int) -> BatchCreate:
    """A JSONL body (one request per line; blank lines skipped) and the batch's other
    fields (`options`: id, completion_window_s, webhook_url, as query parameters
    give them; any other is refused). A bad line is MalformedBody naming its line
    number; past `max_items` requests it stops reading (InvalidRequest)."""
    if unknown := sorted(set(options) - set(JSONL_OPTIONS)):
        raise InvalidRequest(f"unknown query parameter {unknown[0]!r} (a JSONL batch takes "
                             f"{', '.join(JSONL_OPTIONS)})",
                             details=[{"field": unknown[0], "type": "extra_forbidden"}])
    requests = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if len(requests) == max_items:
            raise InvalidRequest(f"more than the batch limit of {max_items} requests",
                                 details=[{"field": "requests", "type": "too_long"}])
        try:
            item = load_json(line)
        except MalformedBody as e:
            raise MalformedBody(f"line {n}: {e.message}") from None
        if not isinstance(item, dict):
            raise MalformedBody(f"line {n}: a request must be a JSON object")
        requests.append(item)
    if "completion_window_s" in options:
        try:
            options = {**options, "completion_window_s": int(options["completion_window_s"])}
        except ValueError:
            raise InvalidRequest("completion_window_s must be an integer", details=[
                {"field": "completion_window_s", "type": "int_parsing"}]) from None
    return validate(BatchCreate, {**options, "requests": requests})


def manifest_key(batch_id: str) -> str:
    """Where a batch's results manifest is written in the object store when it ends:
    one JSON line per item (as GET /v1/batches/{id}/results gives them)."""
    return f"batches/{batch_id}/results.jsonl"


def manifest(items: list[Item]) -> bytes:
    return b"".join(ItemView.of(i).model_dump_json().encode() + b"\n" for i in items)


class BatchView(BaseModel):
    id: str
    state: str = Field(description="running | completed | cancelled")
    created: float
    deadline: float = Field(description="created + completion_window_s")
    counts: dict[ItemState, int]
    progress: float = Field(description="items ended (succeeded, dead, cancelled, purged) "
                            "/ all")
    late: bool = Field(description="running past its deadline")
    webhook_url: str | None = None
    manifest: str | None = Field(None, description="once it has ended (nothing pending or "
                                 "running) where results are stored: the object-store key "
                                 "of its results manifest (JSON lines, one per item)")

    @classmethod
    def of(cls, b: Batch, manifests: bool = True) -> BatchView:
        total = sum(b.counts.values()) or 1
        ended = sum(b.counts.get(s, 0) for s in ("succeeded", "dead", "cancelled", "purged"))
        deadline = b.created + b.completion_window_s
        return cls(id=b.id, state=b.state, created=b.created, deadline=deadline,
                   counts=b.counts, progress=round(ended / total, 4),
                   late=b.state == "running" and time.time() > deadline,
                   webhook_url=b.webhook_url,
                   manifest=manifest_key(b.id) if manifests and b.state != "running"
                   and not b.counts.get("leased") else None)


class ItemView(BaseModel):
    index: int
    state: ItemState
    attempts: int
    result: dict | None = None
    error: str | None = None

    @classmethod
    def of(cls, i: Item) -> ItemView:
        return cls(index=i.index, state=i.state, attempts=i.attempts, result=i.result,
                   error=i.last_error if i.state == "dead" else None)


Check = Callable[[GenerateRequest, Principal], Awaitable[None]]


class BatchJobs:
    def __init__(self, queue: BatchQueue, check: Check, *, max_items: int = 1000,
                 allow_webhook: Callable[[str], None] | None = None,
                 ended: Callable[[str], Awaitable[bool]] | None = None,
                 manifests: bool = False) -> None:
        self.queue = queue
        self.ended = ended  # records a batch's end (the worker's notify_if_done)
        self.manifests = manifests  # an ended batch's manifest is written (a store)
        self._ending: set[asyncio.Task] = set()
        self.check = check  # one request through render, policy, plan and admit
        self.max_items = max_items
        self.allow_webhook = allow_webhook  # raises InvalidRequest off the allowlist

    async def submit(self, caller: Principal, body: BatchCreate) -> BatchView:
        if len(body.requests) > self.max_items:
            raise InvalidRequest(f"{len(body.requests)} requests exceed the batch limit of "
                                 f"{self.max_items}", details=[{"field": "requests",
                                                                "type": "too_long"}])
        if body.webhook_url is not None:
            if self.allow_webhook is None:
                raise InvalidRequest("this service sends no webhooks (no allowlist)",
                                     details=[{"field": "webhook_url", "type": "not_allowed"}])
            self.allow_webhook(body.webhook_url)
        batch_id = body.id or "b_" + secrets.token_hex(12)
        if (known := await self.queue.get(batch_id)) is not None:
            if known.principal != caller.name:
                raise InvalidRequest(f"batch id {batch_id!r} is taken; choose another",
                                     details=[{"field": "id", "type": "taken"}])
            return self._view(known)  # a resubmission: the same batch
        requests = []
        for i, raw in enumerate(body.requests):
            try:
                req = validate(GenerateRequest, raw)
                if req.seed is None:  # drawn now: a retried item is the same recipe
                    req = req.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
                await self.check(req, caller)
            except ImagegenError as e:
                # The same error (its status, Retry-After, successor...), naming the item
                e.message = f"requests[{i}]: {e.message}"
                e.details = [{**d, "field": f"requests.{i}.{d.get('field', '')}".rstrip(".")}
                             for d in (e.details if isinstance(e.details, list) else [{}])]
                raise
            requests.append(req.model_dump(mode="json", exclude_none=True))
        batch = Batch(id=batch_id, principal=caller.name, created=time.time(),
                      completion_window_s=body.completion_window_s,
                      webhook_url=body.webhook_url)
        await self.queue.create(batch, requests)
        return self._view(await self.queue.get(batch_id))

    async def submit_jsonl(self, caller: Principal, raw: bytes,
                           options: dict[str, Any]) -> BatchView:
        """A JSONL body and its query parameters (from_jsonl)."""
        return await self.submit(caller, from_jsonl(raw, options, self.max_items))

    async def get(self, caller: Principal, batch_id: str) -> Batch:
        batch = await self.queue.get(batch_id) if _valid(batch_id) else None
        if batch is None or (batch.principal != caller.name and not caller.has("admin")):
            raise NotFound(f"no batch {batch_id[:64]!r}",
                           details=[{"field": "id", "type": "not_found"}])
        return batch

    async def view(self, caller: Principal, batch_id: str) -> BatchView:
        return self._view(await self.get(caller, batch_id))

    async def mine(self, caller: Principal) -> list[BatchView]:
        return [self._view(b) for b in await self.queue.list(caller.name)]

    async def cancel(self, caller: Principal, batch_id: str) -> BatchView:
        await self.get(caller, batch_id)
        if await self.queue.cancel(batch_id) and self.ended is not None:
            # Nothing in flight, no worker will see it end: record it here, in the
            # background (the manifest's write must not hold up the answer).
            task = asyncio.create_task(self.ended(batch_id))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        return self._view(await self.queue.get(batch_id))

    def _view(self, b: Batch) -> BatchView:
        return BatchView.of(b, self.manifests)

    async def results(self, caller: Principal, batch_id: str) -> list[ItemView]:
        await self.get(caller, batch_id)
        return [ItemView.of(i) for i in await self.queue.items(batch_id)]


def _valid(batch_id: str) -> bool:
    import re

    return re.fullmatch(BATCH_ID.strip("^$"), batch_id) is not None
