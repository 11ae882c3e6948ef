"""The embedded state store: one SQLite file, safe across local processes (WAL,
a busy timeout, one transaction per change). Calls run in a worker thread so the
event loop never waits on the file lock."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import StateUnavailable
from .idempotency import KEEP_S, LEASE_S, Claim
from .keys import KeyExists
from .ledger import (
    EPSILON,
    Admission,
    Budget,
    Reservation,
    Usage,
    day_of,
    month_of,
    refilled,
    seconds_to,
    seconds_to_full,
    seconds_to_midnight,
)
from .principals import KeyRecord

log = logging.getLogger("imagegen.state")

BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quota (
    principal TEXT PRIMARY KEY,
    tokens REAL NOT NULL, at REAL NOT NULL, credits REAL NOT NULL,
    day INTEGER NOT NULL, day_used REAL NOT NULL,
    month INTEGER NOT NULL, month_units REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL,
    bucket_units REAL NOT NULL, credit_units REAL NOT NULL, units REAL NOT NULL,
    day INTEGER NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_principal ON reservations (principal, expires);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id    TEXT PRIMARY KEY,
    sha256    TEXT NOT NULL UNIQUE,
    principal TEXT NOT NULL,
    roles     TEXT NOT NULL,
    plan      TEXT NOT NULL,
    created   REAL NOT NULL,
    revoked   REAL
);
CREATE TABLE IF NOT EXISTS idempotency (
    principal TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL, answer TEXT, expires REAL NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency (expires);
"""


class SQLiteDB:
    """One connection, serialised by a lock, used from worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1e3,
                                        isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # Durable when a process dies; an OS crash may lose the last commits (a few
            # charges, never an over-admission: its reservations die with it).
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            log.warning("state store %s: %s", self.path, e)
            raise StateUnavailable("the state store is unavailable") from None
        self.lock = threading.Lock()
        # Its own thread: a call waiting on the file lock (up to the busy timeout) never
        # holds one of the default executor's threads, which encode PNGs.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="imagegen-sqlite")

    async def run(self, fn, *args):
        def call():
            with self.lock:
                try:
                    return fn(self.conn, *args)
                except sqlite3.IntegrityError:
                    raise
                except sqlite3.Error as e:
                    log.warning("state store %s: %s", self.path, e)
                    raise StateUnavailable("the state store is unavailable") from None

        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def close(self) -> None:
        with self.lock:
            self.conn.close()
        self.executor.shutdown(wait=False)


def _row(r) -> KeyRecord:
    return KeyRecord(key_id=r[0], sha256=r[1], principal=r[2], roles=tuple(json.loads(r[3])),
                     plan=r[4], created=r[5], revoked=r[6])


_COLUMNS = "key_id, sha256, principal, roles, plan, created, revoked"


class SQLiteKeys:
    def __init__(self, path: Path) -> None:
        self.db = SQLiteDB(path)

    async def add(self, record: KeyRecord) -> None:
        def add(conn):
            conn.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (record.key_id, record.sha256, record.principal,
                          json.dumps(list(record.roles)), record.plan, record.created,
                          record.revoked))

        try:
            await self.db.run(add)
        except sqlite3.IntegrityError:
            raise KeyExists(record.key_id) from None

    async def find(self, sha256: str) -> KeyRecord | None:
        def find(conn):
            return conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE sha256 = ?",
                                (sha256,)).fetchone()

        r = await self.db.run(find)
        return None if r is None else _row(r)

    async def revoke(self, key_id: str) -> bool:
        def revoke(conn):
            return conn.execute("UPDATE api_keys SET revoked = ? WHERE key_id = ? AND "
                                "revoked IS NULL", (time.time(), key_id)).rowcount or (
                conn.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
                is not None)

        return bool(await self.db.run(revoke))

    async def list(self) -> list[KeyRecord]:
        def rows(conn):
            return conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created, key_id"
                                ).fetchall()

        return [_row(r) for r in await self.db.run(rows)]

    async def close(self) -> None:
        self.db.close()


class _Q:
    """One principal's quota row, read and written inside a transaction."""

    __slots__ = ("at", "credits", "day", "day_used", "month", "month_units", "principal",
                 "tokens")

    @classmethod
    def load(cls, conn, principal: str, budget: Budget, now: float) -> _Q:
        q = cls()
        row = conn.execute("SELECT tokens, at, credits, day, day_used, month, month_units "
                           "FROM quota WHERE principal = ?", (principal,)).fetchone()
        q.principal = principal
        if row is None:
            row = (budget.burst, now, 0.0, day_of(now), 0.0, month_of(now), 0.0)
        (q.tokens, q.at, q.credits, q.day, q.day_used, q.month, q.month_units) = row
        q.tokens, q.at = refilled(q.tokens, q.at, now, budget), now
        if q.day != day_of(now):
            q.day, q.day_used = day_of(now), 0.0
        if q.month != month_of(now):
            q.month, q.month_units = month_of(now), 0.0
        return q

    def save(self, conn) -> None:
        conn.execute("INSERT OR REPLACE INTO quota VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (self.principal, self.tokens, self.at, self.credits, self.day,
                      self.day_used, self.month, self.month_units))

    def give_back(self, conn, rid: str, keep: float, budget: Budget) -> float | None:
        """Settle reservation `rid`: keep `keep` units, return the rest; the month's
        volume before (None: no such reservation)."""
        row = conn.execute("SELECT bucket_units, credit_units, units, day FROM reservations "
                           "WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return None
        _, credit_units, units, day = row
        back = units - min(max(0.0, keep), units)
        to_credits = min(back, credit_units)  # what is kept is paid from the bucket first
        self.credits += to_credits
        self.tokens = min(budget.burst, self.tokens + back - to_credits)
        if day == self.day:
            self.day_used = max(0.0, self.day_used - back)
        before = self.month_units
        self.month_units += units - back
        conn.execute("DELETE FROM reservations WHERE id = ?", (rid,))
        return before


def transaction(conn, fn):
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT too: never leave the connection inside one
            conn.execute("ROLLBACK")
        raise
    return out


class SQLiteLedger:
    def __init__(self, path: Path) -> None:
        self.db = SQLiteDB(path)

    async def reserve(self, principal: str, units: float, budget: Budget, *,
                      hold_s: float = 600.0) -> Admission:
        def reserve(conn):
            now = time.time()
            q = _Q.load(conn, principal, budget, now)
            for (rid,) in conn.execute("SELECT id FROM reservations WHERE principal = ? AND "
                                       "expires < ?", (principal, now)).fetchall():
                q.give_back(conn, rid, 0.0, budget)  # its request died: refund
            if budget.daily is not None and q.day_used + units > budget.daily + EPSILON:
                q.save(conn)
                return Admission(None, q.tokens, seconds_to_full(q.tokens, budget),
                                 seconds_to_midnight(now), "daily")
            if q.tokens + q.credits + EPSILON < units:
                q.save(conn)
                return Admission(None, q.tokens, seconds_to_full(q.tokens, budget),
                                 seconds_to(units, q.tokens, q.credits, budget), "bucket")
            from_bucket = min(q.tokens, units)
            from_credits = max(0.0, units - from_bucket)
            q.tokens -= from_bucket
            q.credits = max(0.0, q.credits - from_credits)
            q.day_used += units
            rid = uuid.uuid4().hex
            conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (rid, principal, from_bucket, from_credits, units, q.day,
                          now + hold_s))
            q.save(conn)
            return Admission(Reservation(principal, rid, units, budget), q.tokens,
                             seconds_to_full(q.tokens, budget))

        return await self.db.run(lambda conn: transaction(conn, lambda: reserve(conn)))

    async def _settle(self, r: Reservation, keep: float) -> float | None:
        def settle(conn):
            q = _Q.load(conn, r.principal, r.budget, time.time())
            before = q.give_back(conn, r.id, keep, r.budget)
            q.save(conn)
            return before

        return await self.db.run(lambda conn: transaction(conn, lambda: settle(conn)))

    async def commit(self, reservation: Reservation,
                     units: float | None = None) -> float | None:
        return await self._settle(reservation, reservation.units if units is None else units)

    async def refund(self, reservation: Reservation) -> None:
        await self._settle(reservation, 0.0)

    async def usage(self, principal: str, budget: Budget) -> Usage:
        def usage(conn):
            q = _Q.load(conn, principal, budget, time.time())
            held = conn.execute("SELECT COUNT(*) FROM reservations WHERE principal = ?",
                                (principal,)).fetchone()[0]
            return Usage(q.tokens, q.credits, q.day_used, q.month_units, held)

        return await self.db.run(usage)

    async def grant(self, principal: str, units: float) -> float:
        def grant(conn):
            row = conn.execute("SELECT credits FROM quota WHERE principal = ?",
                               (principal,)).fetchone()
            if row is None:  # a principal never seen: its bucket starts full at first use
                conn.execute("INSERT INTO quota VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (principal, float("inf"), 0.0, units, 0, 0.0, 0, 0.0))
                return units
            conn.execute("UPDATE quota SET credits = credits + ? WHERE principal = ?",
                         (units, principal))
            return row[0] + units

        return await self.db.run(lambda conn: transaction(conn, lambda: grant(conn)))

    async def close(self) -> None:
        self.db.close()


class SQLiteReplays:
    """Idempotency keys (idempotency.py): one row per principal and key; `answer`
    NULL while the first request runs."""

    PURGE_EVERY_S = 60.0  # expired rows (answers with their images) of everyone

    def __init__(self, path: Path) -> None:
        self.db = SQLiteDB(path)
        self._purged = 0.0

    async def claim(self, principal: str, key: str, fingerprint: str, owner: str,
                    lease_s: float = LEASE_S) -> Claim:
        def claim(conn):
            now = time.time()
            if now - self._purged >= self.PURGE_EVERY_S:
                conn.execute("DELETE FROM idempotency WHERE expires < ?", (now,))
                self._purged = now
            else:
                conn.execute("DELETE FROM idempotency WHERE principal = ? AND key = ? AND "
                             "expires < ?", (principal, key, now))
            row = conn.execute("SELECT fingerprint, owner, answer FROM idempotency WHERE "
                               "principal = ? AND key = ?", (principal, key)).fetchone()
            if row is None:
                conn.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?, NULL, ?)",
                             (principal, key, fingerprint, owner, now + lease_s))
                return Claim("new")
            if row[0] != fingerprint:
                return Claim("mismatch")
            if row[2] is not None:
                return Claim("done", row[2])
            return Claim("new" if row[1] == owner else "running")

        return await self.db.run(lambda conn: transaction(conn, lambda: claim(conn)))

    async def complete(self, principal: str, key: str, owner: str, answer: str,
                       keep_s: float = KEEP_S) -> None:
        await self.db.run(lambda conn: conn.execute(
            "UPDATE idempotency SET answer = ?, expires = ? WHERE principal = ? AND key = ? "
            "AND owner = ? AND answer IS NULL",
            (answer, time.time() + keep_s, principal, key, owner)))

    async def release(self, principal: str, key: str, owner: str) -> None:
        await self.db.run(lambda conn: conn.execute(
            "DELETE FROM idempotency WHERE principal = ? AND key = ? AND owner = ? AND "
            "answer IS NULL", (principal, key, owner)))

    async def close(self) -> None:
        self.db.close()
