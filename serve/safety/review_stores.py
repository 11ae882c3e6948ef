"""The review queue's backends (review.py), on the state store: one SQLite table, or
Redis keys under one hash tag (`{imagegen:review}`: one slot on a cluster; a queue
of blocked requests is small). An item is stored whole as JSON; a decision or an
appeal rewrites it in one transaction (SQLite) or one compare-and-set script (Redis).
A flagged image's PNG is kept beside its item (a BLOB; base64 in Redis), written with
it."""

from __future__ import annotations

import base64
from pathlib import Path

from ..quotas.redis_backend import connect, unavailable
from ..quotas.sqlite_backend import SQLiteDB, transaction
from .review import Appeal, Decision, ReviewItem, Status

_SCHEMA = """
CREATE TABLE IF NOT EXISTS review (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, request_id TEXT NOT NULL,
    principal TEXT NOT NULL, restricted INTEGER NOT NULL, status TEXT NOT NULL,
    item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS review_by_state ON review (restricted, status, created);
CREATE INDEX IF NOT EXISTS review_by_request ON review (request_id);
CREATE TABLE IF NOT EXISTS review_evidence (
    id TEXT NOT NULL, idx INTEGER NOT NULL, png BLOB NOT NULL, PRIMARY KEY (id, idx)
);
"""


def _decided(item: ReviewItem, d: Decision) -> ReviewItem:
    return item.model_copy(update={"decision": d, "status": d.decision})


def _appealed(item: ReviewItem, a: Appeal) -> ReviewItem | None:
    if item.principal != a.principal:
        return None
    return item.model_copy(update={"appeals": [*item.appeals, a]})


class SQLiteReview:
    def __init__(self, path: Path) -> None:
        self.db = SQLiteDB(path)
        self.db.conn.executescript(_SCHEMA)

    async def add(self, item: ReviewItem, evidence: dict[int, bytes] | None = None) -> None:
        def add(conn):
            new = conn.execute(
                "INSERT OR IGNORE INTO review VALUES (?, ?, ?, ?, ?, ?, ?)",  # a retried add
                (item.id, item.created.isoformat(), item.request_id, item.principal,
                 int(item.restricted), item.status, item.model_dump_json())).rowcount
            if new:  # a retry adds nothing, its evidence neither
                conn.executemany("INSERT OR IGNORE INTO review_evidence VALUES (?, ?, ?)",
                                 [(item.id, i, png) for i, png in (evidence or {}).items()])

        await self.db.run(lambda conn: transaction(conn, lambda: add(conn)))

    async def evidence(self, item_id: str, index: int) -> bytes | None:
        row = await self.db.run(lambda conn: conn.execute(
            "SELECT png FROM review_evidence WHERE id = ? AND idx = ?",
            (item_id, index)).fetchone())
        return None if row is None else bytes(row[0])

    async def get(self, item_id: str) -> ReviewItem | None:
        row = await self.db.run(lambda conn: conn.execute(
            "SELECT item FROM review WHERE id = ?", (item_id,)).fetchone())
        return None if row is None else ReviewItem.model_validate_json(row[0])

    async def list(self, status: Status | None = "open", *, restricted: bool = False,
                   limit: int = 100) -> list[ReviewItem]:
        def rows(conn):
            where, args = "restricted = ?", [int(restricted)]
            if status is not None:
                where, args = where + " AND status = ?", [*args, status]
            return conn.execute(f"SELECT item FROM review WHERE {where} ORDER BY created "
                                "LIMIT ?", (*args, limit)).fetchall()

        return [ReviewItem.model_validate_json(r[0]) for r in await self.db.run(rows)]

    async def _update(self, where: str, key: str, change) -> ReviewItem | None:
        def update(conn):
            row = conn.execute(f"SELECT id, item FROM review WHERE {where} = ?",
                               (key,)).fetchone()
            if row is None:
                return None
            new = change(ReviewItem.model_validate_json(row[1]))
            if new is not None:
                conn.execute("UPDATE review SET status = ?, item = ? WHERE id = ?",
                             (new.status, new.model_dump_json(), row[0]))
            return new

        return await self.db.run(lambda conn: transaction(conn, lambda: update(conn)))

    async def decide(self, item_id: str, decision: Decision) -> ReviewItem | None:
        return await self._update("id", item_id, lambda item: _decided(item, decision))

    async def appeal(self, request_id: str, appeal: Appeal) -> ReviewItem | None:
        return await self._update("request_id", request_id,
                                  lambda item: _appealed(item, appeal))

    async def close(self) -> None:
        self.db.close()


_TAG = "{imagegen:review}"
_ITEM, _ALL, _BY_REQUEST = f"{_TAG}:item:", f"{_TAG}:all", f"{_TAG}:by_request"
_EVIDENCE = f"{_TAG}:evidence:"
# KEYS: the item, the index by time, the index by request, then one per evidence
# image. ARGV: id, score, request id, JSON, then the images (base64). Idempotent
# under a retry: an id is added once, with its evidence.
_ADD = """
if redis.call('SETNX', KEYS[1], ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
  for i = 4, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 1]) end
end
return 1
"""
# Compare and set: KEYS[1] the item; ARGV the JSON read and the JSON to write.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


class RedisReview:
    def __init__(self, url: str) -> None:
        self.redis = connect(url)
        self._add = self.redis.register_script(_ADD)
        self._swap = self.redis.register_script(_SWAP)

    @unavailable
    async def add(self, item: ReviewItem, evidence: dict[int, bytes] | None = None) -> None:
        shots = sorted((evidence or {}).items())
        await self._add(keys=[_ITEM + item.id, _ALL, _BY_REQUEST,
                              *(f"{_EVIDENCE}{item.id}:{i}" for i, _ in shots)],
                        args=[item.id, item.created.timestamp(), item.request_id,
                              item.model_dump_json(),
                              *(base64.b64encode(png).decode() for _, png in shots)])

    @unavailable
    async def evidence(self, item_id: str, index: int) -> bytes | None:
        raw = await self.redis.get(f"{_EVIDENCE}{item_id}:{index}")
        return None if raw is None else base64.b64decode(raw)

    @unavailable
    async def get(self, item_id: str) -> ReviewItem | None:
        raw = await self.redis.get(_ITEM + item_id)
        return None if raw is None else ReviewItem.model_validate_json(raw)

    @unavailable
    async def list(self, status: Status | None = "open", *, restricted: bool = False,
                   limit: int = 100) -> list[ReviewItem]:
        ids = await self.redis.zrange(_ALL, 0, -1)
        raws = await self.redis.mget([_ITEM + i for i in ids]) if ids else []  # one slot
        items = [ReviewItem.model_validate_json(r) for r in raws if r is not None]
        return [i for i in items if i.restricted == restricted
                and (status is None or i.status == status)][:limit]

    async def _update(self, item_id: str | None, change) -> ReviewItem | None:
        if item_id is None:
            return None
        for _ in range(8):  # a concurrent decision or appeal: read again
            raw = await self.redis.get(_ITEM + item_id)
            if raw is None:
                return None
            new = change(ReviewItem.model_validate_json(raw))
            if new is None:
                return None
            if await self._swap(keys=[_ITEM + item_id], args=[raw, new.model_dump_json()]):
                return new
        raise RuntimeError(f"review item {item_id}: too many concurrent updates")

    @unavailable
    async def decide(self, item_id: str, decision: Decision) -> ReviewItem | None:
        return await self._update(item_id, lambda item: _decided(item, decision))

    @unavailable
    async def appeal(self, request_id: str, appeal: Appeal) -> ReviewItem | None:
        item_id = await self.redis.hget(_BY_REQUEST, request_id)
        return await self._update(item_id, lambda item: _appealed(item, appeal))

    async def close(self) -> None:
        await self.redis.aclose()
