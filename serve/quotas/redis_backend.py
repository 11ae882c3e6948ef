"""The cluster state store: Redis, one server (`redis://`, `rediss://`) or a Redis
Cluster (`redis+cluster://HOST:PORT`, `rediss+cluster://`: one seed node, the client
finds the rest). Keys carry hash tags (`{imagegen}` for the key index,
`{imagegen:<principal>}` for a principal's quota), so every script and multi-key
command touches one slot: principals spread over a cluster's nodes, the key store
lives on one. A connection failure is StateUnavailable (503, fail closed), never a
hang: calls time out, and one is retried on a fresh connection, so every script is
idempotent under a retry."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, TimeoutError

from ..errors import StateUnavailable
from .idempotency import KEEP_S, LEASE_S, Claim
from .keys import KeyExists
from .ledger import (
    EPSILON,
    HOLD_S,
    Admission,
    Budget,
    Reservation,
    Usage,
    day_of,
    month_of,
    refilled,
    seconds_to,
    seconds_to_full,
)
from .principals import KeyRecord

log = logging.getLogger("imagegen.state")

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


class _Cluster(RedisCluster):
    async def execute_command(self, *args, **kwargs):
        # Discover the cluster before routing: redis-py 8.1 picks a command's node
        # before its lazy discovery, so calls made at once on a new client go to
        # random nodes, and the MOVED replies end in closing every connection under
        # the others (AttributeError, ConnectionError). Once discovered, this returns
        # at once.
        await self.initialize()
        return await super().execute_command(*args, **kwargs)


def connect(url: str) -> aioredis.Redis | RedisCluster:
    # One retry on a fresh connection: after Redis restarts, every pooled connection
    # is dead, and the first use of each would otherwise fail a request. A command
    # whose reply was lost runs twice, so each script is idempotent (by its id).
    options = {"socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S,
               "decode_responses": True, "retry": Retry(NoBackoff(), 1)}
    scheme, rest = url.split("://", 1)
    if scheme.endswith("+cluster"):
        # The cluster client retries by itself, not per connection: on a connection
        # error or timeout it drops that node's connections, asks a node for the slot
        # map again (CLUSTER SLOTS) and resends, `retry`'s count of times.
        return _Cluster.from_url(f"{scheme.removesuffix('+cluster')}://{rest}", **options)
    return aioredis.from_url(url, **options, retry_on_error=[ConnectionError, TimeoutError])


def unavailable(fn):
    """RedisError -> StateUnavailable naming the store (never the password)."""

    @functools.wraps(fn)
    async def call(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        # RedisClusterException is no RedisError: a cluster with no node reachable
        # (or its slots not all covered) says so with it.
        except (RedisError, RedisClusterException) as e:
            log.warning("state store (redis): %s: %s", type(e).__name__, e)
            raise StateUnavailable("the state store is unavailable") from None

    return call


class RedisKeys:
    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        self._add = self.redis.register_script(_ADD)

    @unavailable
    async def add(self, record: KeyRecord) -> None:
        added = await self._add(keys=[_KEY + record.sha256, _IDS],
                                args=[record.key_id, record.sha256, record.model_dump_json()])
        if not added and await self.find(record.sha256) != record:  # not our own retry
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
        # One MGET: every record shares the {imagegen} slot, as a cluster requires.
        raws = await self.redis.mget([_KEY + s for s in shas]) if shas else []
        records = [KeyRecord.model_validate_json(r) for r in raws if r is not None]
        return sorted(records, key=lambda r: (r.created, r.key_id))

    async def close(self) -> None:
        await self.redis.aclose()


# One principal's quota is one hash, {imagegen:<principal>}:quota: tokens, at,
# credits, day, day_used, month, month_units, and each held reservation as a field
# r:<id> = "bucket|credit|units|day|expires". One key per script: Cluster-safe.
_QUOTA_LOAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local k = KEYS[1]
local burst, refill = tonumber(ARGV[1]), tonumber(ARGV[2])
-- the UTC month (yyyymm) from Redis's clock: civil date from days since 1970
local z = math.floor(now / 86400) + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                        - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local mon = mp < 10 and mp + 3 or mp - 9
local month = (yoe + era * 400 + (mon <= 2 and 1 or 0)) * 100 + mon
local h = redis.call('HGETALL', k)
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
local tokens = tonumber(f.tokens or burst)
local at = tonumber(f.at or now)
local credits = tonumber(f.credits or 0)
local day = math.floor(now / 86400)
local day_used = tonumber(f.day_used or 0)
if tonumber(f.day or -1) ~= day then day_used = 0 end
local month_units = tonumber(f.month_units or 0)
if tonumber(f.month or -1) ~= month then month_units = 0 end
tokens = math.min(burst, tokens + math.max(0, now - at) * refill)
local function give_back(name, keep)
  local v = f[name]
  if not v then return nil end
  local b, c, u, d = string.match(v, '([^|]+)|([^|]+)|([^|]+)|([^|]+)|')
  c, u, d = tonumber(c), tonumber(u), tonumber(d)
  local back = u - math.min(math.max(0, keep), u)
  local to_credits = math.min(back, c)  -- what is kept is paid from the bucket first
  credits = credits + to_credits
  tokens = math.min(burst, tokens + back - to_credits)
  if d == day then day_used = math.max(0, day_used - back) end
  local before = month_units
  month_units = month_units + u - back
  redis.call('HDEL', k, name)
  f[name] = nil
  return before
end
local function save()
  local fmt = '%.17g'
  redis.call('HSET', k, 'tokens', string.format(fmt, tokens), 'at', string.format(fmt, now),
             'credits', string.format(fmt, credits), 'day', day,
             'day_used', string.format(fmt, day_used), 'month', month,
             'month_units', string.format(fmt, month_units))
end
"""

# ARGV 3..: units, daily (-1: none), hold_s, reservation id, epsilon.
_RESERVE = _QUOTA_LOAD + """
local units, daily, hold, rid, eps = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  ARGV[6], tonumber(ARGV[7])
if f['r:' .. rid] then  -- a retry of a reserve that ran: the same answer, charged once
  return {1, string.format('%.17g', tokens), '', '', string.format('%.17g', credits)}
end
for name, v in pairs(f) do
  if string.sub(name, 1, 2) == 'r:' then
    local expires = tonumber(string.match(v, '|([^|]+)$'))
    if expires < now then give_back(name, 0) end
  end
end
if daily >= 0 and day_used + units > daily + eps then
  save()
  return {0, string.format('%.17g', tokens), 'daily', string.format('%.17g', 86400 - now % 86400),
          string.format('%.17g', credits)}
end
if tokens + credits + eps < units then
  save()
  return {0, string.format('%.17g', tokens), 'bucket', '', string.format('%.17g', credits)}
end
local from_bucket = math.min(tokens, units)
local from_credits = math.max(0, units - from_bucket)
tokens = tokens - from_bucket
credits = math.max(0, credits - from_credits)
day_used = day_used + units
redis.call('HSET', k, 'r:' .. rid, string.format('%.17g|%.17g|%.17g|%d|%.17g', from_bucket,
           from_credits, units, day, now + hold))
save()
return {1, string.format('%.17g', tokens), '', '', string.format('%.17g', credits)}
"""

# ARGV 3..: reservation id, units kept. Returns the month's volume before, or -1.
_SETTLE = _QUOTA_LOAD + """
local before = give_back('r:' .. ARGV[3], tonumber(ARGV[4]))
if before == nil then return '-1' end
save()
return string.format('%.17g', before)
"""


# ARGV: grant id, units. Applied once per id (a retried grant adds nothing more).
_GRANT = """
if redis.call('HSETNX', KEYS[1], 'g:' .. ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'credits', ARGV[2])
end
return redis.call('HGET', KEYS[1], 'credits')
"""


# The hash and the clock of the node that holds it, in one call: on a cluster, a
# separate TIME would be answered by another node, by another clock.
_USAGE = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}
"""


def _quota_key(principal: str) -> str:
    return "{imagegen:" + principal + "}:quota"


class RedisLedger:
    def __init__(self, url: str) -> None:
        from uuid import uuid4

        self._uuid = uuid4
        self.redis = connect(url)
        self._reserve = self.redis.register_script(_RESERVE)
        self._settle_script = self.redis.register_script(_SETTLE)
        self._grant = self.redis.register_script(_GRANT)
        self._usage = self.redis.register_script(_USAGE)

    @staticmethod
    def _budget_args(budget: Budget) -> list:
        return [repr(float(budget.burst)), repr(float(budget.refill_per_s))]

    @unavailable
    async def reserve(self, principal: str, units: float, budget: Budget, *,
                      hold_s: float = HOLD_S) -> Admission:
        rid = self._uuid().hex
        ok, tokens, reason, retry, credits = await self._reserve(
            keys=[_quota_key(principal)],
            args=[*self._budget_args(budget), repr(float(units)),
                  -1 if budget.daily is None else repr(float(budget.daily)), repr(hold_s), rid,
                  repr(EPSILON)])
        tokens, credits = float(tokens), float(credits)
        if ok:
            return Admission(Reservation(principal, rid, units, budget), tokens,
                             seconds_to_full(tokens, budget))
        wait = float(retry) if reason == "daily" else seconds_to(units, tokens, credits, budget)
        return Admission(None, tokens, seconds_to_full(tokens, budget), wait, reason)

    async def _settle(self, r: Reservation, keep: float) -> float | None:
        before = float(await self._settle_script(keys=[_quota_key(r.principal)],
                                                 args=[*self._budget_args(r.budget), r.id,
                                                       repr(float(keep))]))
        return None if before < 0 else before

    @unavailable
    async def commit(self, reservation: Reservation,
                     units: float | None = None) -> float | None:
        return await self._settle(reservation, reservation.units if units is None else units)

    @unavailable
    async def refund(self, reservation: Reservation) -> None:
        await self._settle(reservation, 0.0)

    @unavailable
    async def usage(self, principal: str, budget: Budget) -> Usage:
        sec, usec, fields = await self._usage(keys=[_quota_key(principal)])
        f = dict(zip(fields[::2], fields[1::2]))
        now = int(sec) + int(usec) / 1e6
        tokens = refilled(float(f.get("tokens", budget.burst)), float(f.get("at", now)), now,
                          budget)
        today = float(f.get("day_used", 0)) if int(f.get("day", -1)) == day_of(now) else 0.0
        month = (float(f.get("month_units", 0)) if int(f.get("month", -1)) == month_of(now)
                 else 0.0)
        held = sum(1 for name in f if name.startswith("r:"))
        return Usage(tokens, float(f.get("credits", 0)), today, month, held)

    @unavailable
    async def grant(self, principal: str, units: float) -> float:
        return float(await self._grant(keys=[_quota_key(principal)],
                                       args=[self._uuid().hex, repr(float(units))]))

    async def close(self) -> None:
        await self.redis.aclose()


# An idempotency key is one hash, {imagegen:<principal>}:idem:<sha256 of the key>:
# fp, owner, and the answer once done; it expires (the lease, then the keep).
# KEYS: the hash. ARGV: fingerprint, owner, lease seconds.
_CLAIM = """
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if fp ~= ARGV[1] then return {'mismatch'} end
local answer = redis.call('HGET', KEYS[1], 'answer')
if answer then return {'done', answer} end
if redis.call('HGET', KEYS[1], 'owner') == ARGV[2] then return {'new'} end
return {'running'}
"""
# KEYS: the hash. ARGV: owner, answer (empty: release), keep seconds.
_FINISH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'answer') == 1 then
  return 0
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'answer', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


def _idem_key(principal: str, key: str) -> str:
    return "{imagegen:" + principal + "}:idem:" + hashlib.sha256(key.encode()).hexdigest()


class RedisReplays:
    """Idempotency keys (idempotency.py), one hash per key in the principal's slot."""

    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        self._claim = self.redis.register_script(_CLAIM)
        self._finish = self.redis.register_script(_FINISH)

    @unavailable
    async def claim(self, principal: str, key: str, fingerprint: str, owner: str,
                    lease_s: float = LEASE_S) -> Claim:
        got = await self._claim(keys=[_idem_key(principal, key)],
                                args=[fingerprint, owner, math.ceil(lease_s)])
        return Claim(got[0], got[1] if len(got) > 1 else None)

    @unavailable
    async def complete(self, principal: str, key: str, owner: str, answer: str,
                       keep_s: float = KEEP_S) -> None:
        await self._finish(keys=[_idem_key(principal, key)],
                           args=[owner, answer, math.ceil(keep_s)])

    @unavailable
    async def release(self, principal: str, key: str, owner: str) -> None:
        await self._finish(keys=[_idem_key(principal, key)], args=[owner, "", 0])

    async def close(self) -> None:
        await self.redis.aclose()
