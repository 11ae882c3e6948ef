"""Stage 1, authenticate: an `Authorization: Bearer <key>` value -> the Principal,
from the mounted keys file or the state store. Lookups are cached for a few
seconds (a revoked key stops working within `ttl_s`); a store that cannot be
reached fails closed (503 state_unavailable), never open."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import Unauthenticated
from .keys import FileKeys, KeyStore
from .principals import KeyRecord, Principal, bearer, key_hash

CACHE_TTL_S = 5.0
CACHE_SIZE = 4096  # bad keys are cached too: bounded, so random ones cannot grow it


class Authenticator:
    def __init__(self, store: KeyStore | None, file: FileKeys | None = None, *,
                 ttl_s: float = CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.file = file
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        sha = key_hash(bearer(authorization))
        record = await self._lookup(sha)
        if record is None or record.revoked is not None:
            raise Unauthenticated("invalid or revoked API key")
        return Principal(name=record.principal, roles=frozenset(record.roles),
                         plan=record.plan, key_id=record.key_id)

    async def _lookup(self, sha: str) -> KeyRecord | None:
        now = self.clock()
        hit = self._cache.get(sha)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(sha)
            return hit[1]
        record = self.file.by_hash.get(sha) if self.file else None
        if record is None and self.store is not None:
            record = await self.store.find(sha)  # StateUnavailable propagates: fail closed
        self._cache[sha] = (now + self.ttl_s, record)
        self._cache.move_to_end(sha)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return record
