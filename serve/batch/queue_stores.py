"""The batch queue's backends (queue.py), on the state store.

SQLite: two tables, `batches` and `batch_items`, with partial indexes for the ready
items, the leases and the dead; every change is one `BEGIN IMMEDIATE` transaction, so
two processes claiming at once are serialised by the file lock.

Redis: every key under one hash tag, `{imagegen:batch}` (one slot: a Cluster works,
and every script may touch any key of the queue). An item is a hash; a batch is a hash
holding its counts by state (kept by the scripts that move items, so `get` is O(1));
three sorted sets index the items: `ready` (pending, scored by not_before), `leases`
(leased, scored by lease_until) and `dead` (scored by when they died). Claim,
complete, fail, renew, cancel, replay and purge are each one Lua script: atomic.

Why sorted sets, not Redis Streams with consumer groups and XAUTOCLAIM: a stream
entry is delivered and redelivered, but a per-item retry delay (not_before), a lease
token that a reclaimed worker's late `complete` must be refused by, attempts, the
result and counts by state are state beyond a stream entry: a stream would still need
the item hash beside it, and then two structures to keep in step instead of one. A
sorted set scored by time is the delay queue and the lease table in one.

Why not a job library (arq, rq, saq, Celery): none has a SQLite backend, and the
design is one interface with interchangeable backends run through one contract
suite; a library would also own the worker loop, which here must call the service's
own stages (quotas, safety, storage) per item.

Hazard: redis-py retries a command once on a fresh connection, so a script whose
reply was lost may run twice. Create is idempotent by batch id; complete and fail
answer a repeat by the same lease as the first run did; a repeated claim leases more
items under tokens nobody holds: they come back when those leases expire.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

from ..quotas.redis_backend import connect, unavailable
from ..quotas.sqlite_backend import SQLiteDB, transaction
from .queue import (
    ITEM_STATES,
    Batch,
    Item,
    ItemState,
    batch_state,
    counted,
    item_id,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, created REAL NOT NULL,
    completion_window_s REAL NOT NULL, webhook_url TEXT, state TEXT NOT NULL,
    size INTEGER NOT NULL, notified INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_by_principal ON batches (principal, created, id);
CREATE TABLE IF NOT EXISTS batch_items (
    id TEXT PRIMARY KEY, batch_id TEXT NOT NULL, idx INTEGER NOT NULL,
    request TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    not_before REAL NOT NULL, last_error TEXT, result TEXT, lease_owner TEXT,
    lease_until REAL, updated REAL NOT NULL,
    UNIQUE (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS batch_items_ready ON batch_items (not_before, id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS batch_items_leases ON batch_items (lease_until, id)
    WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS batch_items_dead ON batch_items (updated, id)
    WHERE state = 'dead';
"""

_ITEM_COLUMNS = ("id, batch_id, idx, request, state, attempts, not_before, last_error, "
                 "result, lease_owner, lease_until, updated")
_BATCH_COLUMNS = "id, principal, created, completion_window_s, webhook_url, state"


def _check_lease(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s {lease_s!r}: expected > 0 seconds")


def _check_limit(limit: int) -> None:
    # Never 0 or below: SQLite reads LIMIT -1 as none, Redis a range to -1 as all.
    if limit < 1:
        raise ValueError(f"limit {limit!r}: expected >= 1")


def _item_row(r) -> Item:
    return Item(id=r[0], batch_id=r[1], index=r[2], request=json.loads(r[3]), state=r[4],
                attempts=r[5], not_before=r[6], last_error=r[7],
                result=None if r[8] is None else json.loads(r[8]), lease_owner=r[9],
                lease_until=r[10], updated=r[11])


def _add_notified(conn) -> None:
    # A store made before `notified` existed: add the column. Two processes may race
    # here; the loser's "duplicate column" is the column being there.
    if any(c[1] == "notified" for c in conn.execute("PRAGMA table_info(batches)")):
        return
    try:
        conn.execute("ALTER TABLE batches ADD COLUMN notified INTEGER NOT NULL DEFAULT 0")
    except sqlite3.OperationalError as e:
        if "duplicate column" not in str(e):
            raise


def _sqlite_batch(conn, r) -> Batch:
    counts = dict(conn.execute("SELECT state, COUNT(*) FROM batch_items WHERE batch_id = ? "
                               "GROUP BY state", (r[0],)).fetchall())
    return Batch(id=r[0], principal=r[1], created=r[2], completion_window_s=r[3],
                 webhook_url=r[4], state=batch_state(r[5], counts), counts=counted(counts))


class SQLiteQueue:
    def __init__(self, path: Path) -> None:
        self.db = SQLiteDB(path)
        self.db.conn.executescript(_SCHEMA)
        _add_notified(self.db.conn)

    async def _tx(self, fn):
        return await self.db.run(lambda conn: transaction(conn, lambda: fn(conn)))

    async def create(self, batch: Batch, requests: list[dict]) -> list[str]:
        if not requests:
            raise ValueError("a batch needs at least one request")
        rows = [(item_id(batch.id, i), batch.id, i, json.dumps(r), batch.created, batch.created)
                for i, r in enumerate(requests)]

        def create(conn):
            new = conn.execute(
                "INSERT OR IGNORE INTO batches (id, principal, created, completion_window_s, "
                "webhook_url, state, size) VALUES (?, ?, ?, ?, ?, 'running', ?)",
                (batch.id, batch.principal, batch.created, batch.completion_window_s,
                 batch.webhook_url, len(requests))).rowcount
            if not new:  # a retried create: the stored batch is kept
                return conn.execute("SELECT size FROM batches WHERE id = ?",
                                    (batch.id,)).fetchone()[0]
            conn.executemany(
                "INSERT INTO batch_items (id, batch_id, idx, request, state, attempts, "
                "not_before, updated) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)", rows)
            return len(rows)

        return [item_id(batch.id, i) for i in range(await self._tx(create))]

    async def get(self, batch_id: str) -> Batch | None:
        def get(conn):
            r = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?",
                             (batch_id,)).fetchone()
            return None if r is None else _sqlite_batch(conn, r)

        return await self._tx(get)

    async def list(self, principal: str, limit: int = 100) -> list[Batch]:
        _check_limit(limit)
        def rows(conn):
            return [_sqlite_batch(conn, r) for r in conn.execute(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE principal = ? "
                "ORDER BY created DESC, id DESC LIMIT ?", (principal, limit)).fetchall()]

        return await self._tx(rows)

    async def items(self, batch_id: str, state: ItemState | None = None) -> list[Item]:
        where, args = "batch_id = ?", [batch_id]
        if state is not None:
            where, args = where + " AND state = ?", [*args, state]
        rows = await self.db.run(lambda conn: conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM batch_items WHERE {where} ORDER BY idx",
            args).fetchall())
        return [_item_row(r) for r in rows]

    async def claim(self, worker: str, lease_s: float, limit: int,
                    now: float | None = None) -> list[Item]:
        _check_lease(lease_s)
        _check_limit(limit)
        now = time.time() if now is None else now
        token = uuid.uuid4().hex[:12]

        def claim(conn):
            # A dead worker's items of a cancelled batch end there, never run again.
            conn.execute(
                "UPDATE batch_items SET state = 'cancelled', lease_until = NULL, updated = ? "
                "WHERE state = 'leased' AND lease_until < ? AND batch_id IN "
                "(SELECT id FROM batches WHERE state = 'cancelled')", (now, now))
            expired = [r[0] for r in conn.execute(
                "SELECT id FROM batch_items WHERE state = 'leased' AND lease_until < ? "
                "ORDER BY lease_until, id LIMIT ?", (now, limit)).fetchall()]
            ready = [r[0] for r in conn.execute(
                "SELECT id FROM batch_items WHERE state = 'pending' AND not_before <= ? "
                "ORDER BY not_before, id LIMIT ?", (now, limit - len(expired))).fetchall()]
            taken = []
            for n, (iid, lost) in enumerate([(i, True) for i in expired] +
                                            [(i, False) for i in ready]):
                conn.execute(
                    "UPDATE batch_items SET state = 'leased', lease_owner = ?, "
                    "lease_until = ?, updated = ?, attempts = attempts + ?, "
                    "last_error = CASE WHEN ? THEN 'lease expired: ' || lease_owner "
                    "ELSE last_error END WHERE id = ?",
                    (f"{worker}:{token}{n}", now + lease_s, now, int(lost), lost, iid))
                taken.append(iid)
            if not taken:
                return []
            marks = ", ".join("?" * len(taken))
            got = {r[0]: _item_row(r) for r in conn.execute(
                f"SELECT {_ITEM_COLUMNS} FROM batch_items WHERE id IN ({marks})", taken)}
            return [got[i] for i in taken]

        return await self._tx(claim)

    async def complete(self, item_id: str, lease_owner: str, result: dict, *,
                       now: float | None = None) -> bool:
        now = time.time() if now is None else now

        def complete(conn):
            if conn.execute("UPDATE batch_items SET state = 'succeeded', result = ?, "
                            "lease_until = NULL, updated = ? WHERE id = ? AND "
                            "state = 'leased' AND lease_owner = ?",
                            (json.dumps(result), now, item_id, lease_owner)).rowcount:
                return True
            return conn.execute("SELECT 1 FROM batch_items WHERE id = ? AND "  # a repeat
                                "state = 'succeeded' AND lease_owner = ?",
                                (item_id, lease_owner)).fetchone() is not None

        return await self._tx(complete)

    async def fail(self, item_id: str, lease_owner: str, error: str,
                   retry_at: float | None, *, now: float | None = None) -> ItemState | None:
        now = time.time() if now is None else now

        def fail(conn):
            r = conn.execute("SELECT i.state, b.state FROM batch_items i JOIN batches b ON "
                             "b.id = i.batch_id WHERE i.id = ? AND i.lease_owner = ?",
                             (item_id, lease_owner)).fetchone()
            if r is None:
                return None
            if r[0] != "leased":  # a repeat answers as the first did; a lost lease None
                return r[0] if r[0] in ("pending", "dead", "cancelled") else None
            state = ("dead" if retry_at is None else
                     "cancelled" if r[1] == "cancelled" else "pending")
            conn.execute("UPDATE batch_items SET state = ?, attempts = attempts + 1, "
                         "last_error = ?, not_before = ?, lease_until = NULL, updated = ? "
                         "WHERE id = ?",
                         (state, error, now if retry_at is None else retry_at, now, item_id))
            return state

        return await self._tx(fail)

    async def renew(self, item_id: str, lease_owner: str, lease_s: float, *,
                    now: float | None = None) -> bool:
        _check_lease(lease_s)
        now = time.time() if now is None else now
        return bool(await self._tx(lambda conn: conn.execute(
            "UPDATE batch_items SET lease_until = ?, updated = ? WHERE id = ? AND "
            "state = 'leased' AND lease_owner = ?",
            (now + lease_s, now, item_id, lease_owner)).rowcount))

    async def cancel(self, batch_id: str, *, now: float | None = None) -> int:
        now = time.time() if now is None else now

        def cancel(conn):
            live = conn.execute("SELECT COUNT(*) FROM batch_items WHERE batch_id = ? AND "
                                "state IN ('pending', 'leased')", (batch_id,)).fetchone()[0]
            if not live:  # nothing left to cancel: it stays completed
                return 0
            conn.execute("UPDATE batches SET state = 'cancelled' WHERE id = ?", (batch_id,))
            return conn.execute("UPDATE batch_items SET state = 'cancelled', updated = ? "
                                "WHERE batch_id = ? AND state = 'pending'",
                                (now, batch_id)).rowcount

        return await self._tx(cancel)

    async def notify_once(self, batch_id: str) -> bool:
        return bool(await self._tx(lambda conn: conn.execute(
            "UPDATE batches SET notified = 1 WHERE id = ? AND notified = 0",
            (batch_id,)).rowcount))

    async def dead(self, limit: int = 100) -> list[Item]:
        _check_limit(limit)
        rows = await self.db.run(lambda conn: conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM batch_items WHERE state = 'dead' "
            "ORDER BY updated, id LIMIT ?", (limit,)).fetchall())
        return [_item_row(r) for r in rows]

    async def _move_dead(self, item_ids: list[str], sql: str, args: tuple) -> int:
        def move(conn):
            return sum(conn.execute(sql, (*args, i)).rowcount for i in dict.fromkeys(item_ids))

        return await self._tx(move)

    async def replay(self, item_ids: list[str], *, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return await self._move_dead(
            item_ids, "UPDATE batch_items SET state = 'pending', attempts = 0, "
            "not_before = ?, updated = ? WHERE state = 'dead' AND id = ? AND (SELECT state "
            "FROM batches WHERE id = batch_items.batch_id) != 'cancelled'", (now, now))

    async def purge(self, item_ids: list[str], *, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return await self._move_dead(
            item_ids, "UPDATE batch_items SET state = 'purged', updated = ? "
            "WHERE state = 'dead' AND id = ?", (now,))

    async def depth(self, *, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now

        def depth(conn):
            # Literal states: only then may SQLite use the partial indexes.
            out = {s: conn.execute("SELECT COUNT(*) FROM batch_items WHERE "
                                   f"state = '{s}'").fetchone()[0]
                   for s in ("pending", "leased", "dead")}
            out["waiting"] = conn.execute(
                "SELECT COUNT(*) FROM batch_items WHERE state = 'pending' AND not_before > ?",
                (now,)).fetchone()[0]
            out["pending"] -= out["waiting"]
            return out

        return await self.db.run(depth)

    async def close(self) -> None:
        self.db.close()


_TAG = "{imagegen:batch}"
_P = f"{_TAG}:"
_READY, _LEASES, _DEAD = f"{_P}ready", f"{_P}leases", f"{_P}dead"
_KEYS = [_READY, _LEASES, _DEAD]

# Every script: KEYS[1..3] the ready, leases and dead sets; ARGV[1] the key prefix,
# ARGV[2] now; its own arguments from ARGV[3]. Item and batch keys are built inside
# (a claim cannot name its items beforehand); all share the one slot of the tag.
_PRELUDE = """
local READY, LEASES, DEAD = KEYS[1], KEYS[2], KEYS[3]
local P, now = ARGV[1], tonumber(ARGV[2])
local function f17(x) return string.format('%.17g', x) end
local function ikey(id) return P .. 'item:' .. id end
local function bkey(id) return P .. 'batch:' .. id end
local function move(k, batch, from, to)
  redis.call('HINCRBY', bkey(batch), 'n:' .. from, -1)
  redis.call('HINCRBY', bkey(batch), 'n:' .. to, 1)
  redis.call('HSET', k, 'state', to, 'updated', f17(now))
end
"""

# KEYS[4] the batch, KEYS[5] the principal's index. ARGV[2] (now) is its created;
# then batch id, principal, window, has webhook (1/0), webhook, the requests' JSON. A
# batch that exists is kept (a retry): its size is answered.
_CREATE = _PRELUDE + """
local b, id = KEYS[4], ARGV[3]
if redis.call('EXISTS', b) == 1 then return tonumber(redis.call('HGET', b, 'size')) end
local n, created = #ARGV - 7, ARGV[2]
redis.call('HSET', b, 'id', id, 'principal', ARGV[4], 'created', created,
           'completion_window_s', ARGV[5], 'state', 'running', 'size', n, 'n:pending', n)
if ARGV[6] == '1' then redis.call('HSET', b, 'webhook_url', ARGV[7]) end
redis.call('ZADD', KEYS[5], created, id)
for i = 0, n - 1 do
  local iid = string.format('%s-%06d', id, i)
  redis.call('HSET', ikey(iid), 'id', iid, 'batch_id', id, 'index', i, 'request', ARGV[8 + i],
             'state', 'pending', 'attempts', 0, 'not_before', created, 'updated', created)
  redis.call('ZADD', READY, created, iid)
end
return n
"""

# ARGV: worker, lease seconds, limit, token. Expired leases first (a cancelled
# batch's end cancelled), then ready items; each gets lease worker:token<n>.
_CLAIM = _PRELUDE + """
local worker, limit, token = ARGV[3], tonumber(ARGV[5]), ARGV[6]
local till = now + tonumber(ARGV[4])
local out = {}
local function lease(id, k)
  redis.call('HSET', k, 'state', 'leased', 'lease_owner', worker .. ':' .. token .. #out,
             'lease_until', f17(till), 'updated', f17(now))
  redis.call('ZADD', LEASES, f17(till), id)
  out[#out + 1] = redis.call('HGETALL', k)
end
while #out < limit do
  local ids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', '(' .. f17(now), 'LIMIT', 0,
                         limit - #out)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local k = ikey(id)
    local batch, old = unpack(redis.call('HMGET', k, 'batch_id', 'lease_owner'))
    if redis.call('HGET', bkey(batch), 'state') == 'cancelled' then
      redis.call('ZREM', LEASES, id)
      redis.call('HDEL', k, 'lease_until')
      move(k, batch, 'leased', 'cancelled')
    else
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('HSET', k, 'last_error', 'lease expired: ' .. old)
      lease(id, k)
    end
  end
end
if #out < limit then
  local ids = redis.call('ZRANGEBYSCORE', READY, '-inf', f17(now), 'LIMIT', 0, limit - #out)
  for _, id in ipairs(ids) do
    local k = ikey(id)
    redis.call('ZREM', READY, id)
    move(k, redis.call('HGET', k, 'batch_id'), 'pending', 'leased')
    lease(id, k)
  end
end
return out
"""

# ARGV: item id, lease owner, result JSON. 1 recorded (or already, by this lease).
_COMPLETE = _PRELUDE + """
local id = ARGV[3]
local k = ikey(id)
local state, owner, batch = unpack(redis.call('HMGET', k, 'state', 'lease_owner', 'batch_id'))
if owner ~= ARGV[4] then return 0 end
if state == 'succeeded' then return 1 end
if state ~= 'leased' then return 0 end
redis.call('ZREM', LEASES, id)
redis.call('HDEL', k, 'lease_until')
redis.call('HSET', k, 'result', ARGV[5])
move(k, batch, 'leased', 'succeeded')
return 1
"""

# ARGV: item id, lease owner, error, retry at ('': dead). The new state, or nil.
_FAIL = _PRELUDE + """
local id = ARGV[3]
local k = ikey(id)
local state, owner, batch = unpack(redis.call('HMGET', k, 'state', 'lease_owner', 'batch_id'))
if owner ~= ARGV[4] then return false end
if state ~= 'leased' then
  if state == 'pending' or state == 'dead' or state == 'cancelled' then return state end
  return false
end
local to, at = 'pending', ARGV[6]
if at == '' then
  to, at = 'dead', ARGV[2]
elseif redis.call('HGET', bkey(batch), 'state') == 'cancelled' then
  to = 'cancelled'
end
redis.call('ZREM', LEASES, id)
redis.call('HDEL', k, 'lease_until')
redis.call('HINCRBY', k, 'attempts', 1)
redis.call('HSET', k, 'last_error', ARGV[5], 'not_before', at)
move(k, batch, 'leased', to)
if to == 'pending' then redis.call('ZADD', READY, at, id) end
if to == 'dead' then redis.call('ZADD', DEAD, ARGV[2], id) end
return to
"""

# ARGV: item id, lease owner, lease seconds.
_RENEW = _PRELUDE + """
local id = ARGV[3]
local k = ikey(id)
local state, owner = unpack(redis.call('HMGET', k, 'state', 'lease_owner'))
if state ~= 'leased' or owner ~= ARGV[4] then return 0 end
local till = f17(now + tonumber(ARGV[5]))
redis.call('HSET', k, 'lease_until', till, 'updated', f17(now))
redis.call('ZADD', LEASES, till, id)
return 1
"""

# ARGV: batch id. How many pending items it cancelled.
_CANCEL = _PRELUDE + """
local id = ARGV[3]
local b = bkey(id)
local size, pending, leased = unpack(redis.call('HMGET', b, 'size', 'n:pending', 'n:leased'))
if not size or (tonumber(pending or 0) + tonumber(leased or 0)) == 0 then return 0 end
redis.call('HSET', b, 'state', 'cancelled')
local n = 0
for i = 0, tonumber(size) - 1 do
  local iid = string.format('%s-%06d', id, i)
  local k = ikey(iid)
  if redis.call('HGET', k, 'state') == 'pending' then
    redis.call('ZREM', READY, iid)
    move(k, id, 'pending', 'cancelled')
    n = n + 1
  end
end
return n
"""

# ARGV: 'replay' or 'purge', then item ids. How many dead items it moved.
_UNDEAD = _PRELUDE + """
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local k = ikey(id)
  local state, batch = unpack(redis.call('HMGET', k, 'state', 'batch_id'))
  if state == 'dead' then
    if ARGV[3] == 'purge' then
      redis.call('ZREM', DEAD, id)
      move(k, batch, 'dead', 'purged')
      n = n + 1
    elseif redis.call('HGET', bkey(batch), 'state') ~= 'cancelled' then
      redis.call('ZREM', DEAD, id)
      redis.call('HSET', k, 'attempts', 0, 'not_before', ARGV[2])
      redis.call('ZADD', READY, ARGV[2], id)
      move(k, batch, 'dead', 'pending')
      n = n + 1
    end
  end
end
return n
"""

# KEYS[1] the batch. 1 for the first caller; HSETNX alone would create a missing batch.
_NOTIFY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'notified', '1')
"""

# KEYS: hashes of the one slot; each one's fields (an empty list: none).
_READ = """
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('HGETALL', k) end
return out
"""


def _fields(flat: list) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _opt_float(v: str | None) -> float | None:
    return None if v is None else float(v)


def _redis_item(f: dict[str, str]) -> Item:
    return Item(id=f["id"], batch_id=f["batch_id"], index=int(f["index"]),
                request=json.loads(f["request"]), state=f["state"],
                attempts=int(f["attempts"]), not_before=float(f["not_before"]),
                last_error=f.get("last_error"),
                result=json.loads(f["result"]) if "result" in f else None,
                lease_owner=f.get("lease_owner"), lease_until=_opt_float(f.get("lease_until")),
                updated=float(f["updated"]))


def _redis_batch(f: dict[str, str]) -> Batch:
    counts = {s: int(f.get(f"n:{s}", 0)) for s in ITEM_STATES}
    return Batch(id=f["id"], principal=f["principal"], created=float(f["created"]),
                 completion_window_s=float(f["completion_window_s"]),
                 webhook_url=f.get("webhook_url"), state=batch_state(f["state"], counts),
                 counts=counted(counts))


def _now(now: float | None) -> str:
    return repr(float(time.time() if now is None else now))


class RedisQueue:
    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        reg = self.redis.register_script
        self._create, self._claim, self._complete = reg(_CREATE), reg(_CLAIM), reg(_COMPLETE)
        self._fail, self._renew, self._cancel = reg(_FAIL), reg(_RENEW), reg(_CANCEL)
        self._undead, self._read, self._notify = reg(_UNDEAD), reg(_READ), reg(_NOTIFY)

    async def _run(self, script, now: float | None, *args, keys: tuple = ()):
        return await script(keys=[*_KEYS, *keys], args=[_P, _now(now), *args])

    async def _hashes(self, keys: list[str]) -> list[dict[str, str]]:
        return [_fields(f) for f in await self._read(keys=keys) if f] if keys else []

    @unavailable
    async def create(self, batch: Batch, requests: list[dict]) -> list[str]:
        if not requests:
            raise ValueError("a batch needs at least one request")
        size = await self._run(
            self._create, batch.created, batch.id, batch.principal,
            repr(float(batch.completion_window_s)), int(batch.webhook_url is not None),
            batch.webhook_url or "", *(json.dumps(r) for r in requests),
            keys=(f"{_P}batch:{batch.id}", f"{_P}by_principal:{batch.principal}"))
        return [item_id(batch.id, i) for i in range(int(size))]

    @unavailable
    async def get(self, batch_id: str) -> Batch | None:
        flat = await self.redis.hgetall(f"{_P}batch:{batch_id}")
        return _redis_batch(flat) if flat else None

    @unavailable
    async def list(self, principal: str, limit: int = 100) -> list[Batch]:
        _check_limit(limit)
        # Equal scores come back in reverse id order: as SQLite's "created DESC, id DESC".
        ids = await self.redis.zrevrange(f"{_P}by_principal:{principal}", 0, limit - 1)
        return [_redis_batch(f) for f in await self._hashes([f"{_P}batch:{i}" for i in ids])]

    @unavailable
    async def items(self, batch_id: str, state: ItemState | None = None) -> list[Item]:
        size = await self.redis.hget(f"{_P}batch:{batch_id}", "size")
        keys = [f"{_P}item:{item_id(batch_id, i)}" for i in range(int(size or 0))]
        items = [_redis_item(f) for f in await self._hashes(keys)]
        return [i for i in items if state is None or i.state == state]

    @unavailable
    async def claim(self, worker: str, lease_s: float, limit: int,
                    now: float | None = None) -> list[Item]:
        _check_lease(lease_s)
        _check_limit(limit)
        got = await self._run(self._claim, now, worker, repr(float(lease_s)), int(limit),
                              uuid.uuid4().hex[:12])
        return [_redis_item(_fields(f)) for f in got]

    @unavailable
    async def complete(self, item_id: str, lease_owner: str, result: dict, *,
                       now: float | None = None) -> bool:
        return bool(await self._run(self._complete, now, item_id, lease_owner,
                                    json.dumps(result)))

    @unavailable
    async def fail(self, item_id: str, lease_owner: str, error: str,
                   retry_at: float | None, *, now: float | None = None) -> ItemState | None:
        return await self._run(self._fail, now, item_id, lease_owner, error,
                               "" if retry_at is None else repr(float(retry_at)))

    @unavailable
    async def renew(self, item_id: str, lease_owner: str, lease_s: float, *,
                    now: float | None = None) -> bool:
        _check_lease(lease_s)
        return bool(await self._run(self._renew, now, item_id, lease_owner,
                                    repr(float(lease_s))))

    @unavailable
    async def cancel(self, batch_id: str, *, now: float | None = None) -> int:
        return int(await self._run(self._cancel, now, batch_id))

    @unavailable
    async def notify_once(self, batch_id: str) -> bool:
        return bool(await self._notify(keys=[f"{_P}batch:{batch_id}"]))

    @unavailable
    async def dead(self, limit: int = 100) -> list[Item]:
        _check_limit(limit)
        ids = await self.redis.zrange(_DEAD, 0, limit - 1)
        return [_redis_item(f) for f in await self._hashes([f"{_P}item:{i}" for i in ids])]

    @unavailable
    async def replay(self, item_ids: list[str], *, now: float | None = None) -> int:
        return int(await self._run(self._undead, now, "replay", *item_ids))

    @unavailable
    async def purge(self, item_ids: list[str], *, now: float | None = None) -> int:
        return int(await self._run(self._undead, now, "purge", *item_ids))

    @unavailable
    async def depth(self, *, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        return {"pending": await self.redis.zcount(_READY, "-inf", now),
                "waiting": await self.redis.zcount(_READY, f"({now}", "+inf"),
                "leased": await self.redis.zcard(_LEASES),
                "dead": await self.redis.zcard(_DEAD)}

    async def close(self) -> None:
        await self.redis.aclose()
