"""The embedded state store: one SQLite file, safe across local processes (WAL,
a busy timeout, one transaction per change). Calls run in a worker thread so the
event loop never waits on the file lock."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import StateUnavailable
from .keys import KeyExists
from .principals import KeyRecord

BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id    TEXT PRIMARY KEY,
    sha256    TEXT NOT NULL UNIQUE,
    principal TEXT NOT NULL,
    roles     TEXT NOT NULL,
    plan      TEXT NOT NULL,
    created   REAL NOT NULL,
    revoked   REAL
);
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
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StateUnavailable(f"state store {self.path}: {e}") from None
        self.lock = threading.Lock()

    async def run(self, fn, *args):
        def call():
            with self.lock:
                try:
                    return fn(self.conn, *args)
                except sqlite3.IntegrityError:
                    raise
                except sqlite3.Error as e:
                    raise StateUnavailable(f"state store {self.path}: {e}") from None

        return await asyncio.to_thread(call)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


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
