"""Idempotency keys: a retried request (same principal, same `Idempotency-Key`,
same body) gets the first one's answer and is not charged again. The key is the
caller's (HTTP header `Idempotency-Key`, gRPC metadata `idempotency-key`), scoped to
its principal; the first request claims it while it runs, and only a success is
kept (for `KEEP_S`): a failure releases the claim, so the retry runs afresh (a 503
or a 429 was never charged).

A claim is held for `LEASE_S`, past any request's deadline: if the ingress that
ran it died, a retry may run again after that. Replies stored today carry the
images (base64 PNGs); with object storage they become references."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import InvalidRequest

KEEP_S = 86400.0  # a finished request's answer is replayed for a day
LEASE_S = 300.0  # a running request's claim (longer than any request may run)

# Printable ASCII without spaces, as idempotency keys are in practice (UUIDs, ULIDs).
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class Claim:
    """What `claim` found: `new` (this request runs), `done` (`answer` is the first
    request's), `running` (the first is still in flight) or `mismatch` (the key was
    used with another body)."""

    state: Literal["new", "done", "running", "mismatch"]
    answer: str | None = None


class Replays(Protocol):
    async def claim(self, principal: str, key: str, fingerprint: str, owner: str,
                    lease_s: float = LEASE_S) -> Claim:
        """Atomically: claim the key for `owner` if it is free or expired; else what
        holds it. A retried call by the same owner finds its own claim `new`."""
        ...

    async def complete(self, principal: str, key: str, owner: str, answer: str,
                       keep_s: float = KEEP_S) -> None:
        """Keep the owner's answer for `keep_s`."""
        ...

    async def release(self, principal: str, key: str, owner: str) -> None:
        """The owner's request failed: free the key (a finished one stays)."""
        ...

    async def close(self) -> None: ...


def valid_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters "
                             "without spaces (a UUID is a good one)",
                             details=[{"field": "Idempotency-Key", "type": "invalid"}])
    return key


def fingerprint(body_json: str) -> str:
    """What makes two requests the same: their validated request, canonical JSON."""
    return hashlib.sha256(body_json.encode()).hexdigest()


def open_replays(state_url: str) -> Replays:
    from .keys import sqlite_path, state_backend

    if state_backend(state_url) == "sqlite":
        from .sqlite_backend import SQLiteReplays

        return SQLiteReplays(sqlite_path(state_url))
    from .redis_backend import RedisReplays

    return RedisReplays(state_url)
