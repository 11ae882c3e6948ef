"""The cluster state store: Redis. Every key carries the hash tag `{imagegen}`, so a
script touching several keys stays in one slot on Redis Cluster. A connection
failure is StateUnavailable (503, fail closed), never a hang: calls time out."""

from __future__ import annotations

import functools
import time

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import StateUnavailable
from .keys import KeyExists
from .principals import KeyRecord

TIMEOUT_S = 2.0
PREFIX = "{imagegen}"
_KEY, _IDS = f"{PREFIX}:api_key:", f"{PREFIX}:api_key_ids"

# KEYS: the record's key, the id index. ARGV: key id, sha256, record JSON.
_ADD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                             decode_responses=True)


def unavailable(fn):
    """RedisError -> StateUnavailable naming the store (never the password)."""

    @functools.wraps(fn)
    async def call(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except RedisError as e:
            raise StateUnavailable(f"state store (redis) unavailable: {type(e).__name__}: "
                                   f"{e}") from None

    return call


class RedisKeys:
    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        self._add = self.redis.register_script(_ADD)

    @unavailable
    async def add(self, record: KeyRecord) -> None:
        added = await self._add(keys=[_KEY + record.sha256, _IDS],
                                args=[record.key_id, record.sha256, record.model_dump_json()])
        if not added:
            raise KeyExists(record.key_id)

    @unavailable
    async def find(self, sha256: str) -> KeyRecord | None:
        raw = await self.redis.get(_KEY + sha256)
        return None if raw is None else KeyRecord.model_validate_json(raw)

    @unavailable
    async def revoke(self, key_id: str) -> bool:
        sha = await self.redis.hget(_IDS, key_id)
        if sha is None:
            return False
        raw = await self.redis.get(_KEY + sha)
        record = KeyRecord.model_validate_json(raw)
        if record.revoked is None:
            revoked = record.model_copy(update={"revoked": time.time()})
            await self.redis.set(_KEY + sha, revoked.model_dump_json())
        return True

    @unavailable
    async def list(self) -> list[KeyRecord]:
        shas = await self.redis.hvals(_IDS)
        raws = await self.redis.mget([_KEY + s for s in shas]) if shas else []
        records = [KeyRecord.model_validate_json(r) for r in raws if r is not None]
        return sorted(records, key=lambda r: (r.created, r.key_id))

    async def close(self) -> None:
        await self.redis.aclose()
