"""SQLite in WAL mode, the embedded default: one file per replica under data_dir."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from .reader import AuditReader

__all__ = ["SqliteReader", "SqliteSink"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    tenant TEXT,
    backend TEXT,
    outcome TEXT NOT NULL,
    status INTEGER NOT NULL,
    policy_version TEXT,
    sla_met INTEGER,
    latency_ms REAL,
    cost_usd REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE INDEX IF NOT EXISTS audit_tenant_ts ON audit (tenant, ts);
CREATE INDEX IF NOT EXISTS audit_backend_ts ON audit (backend, ts);
"""

_COLUMNS = ("id", "ts", "tenant", "backend", "outcome", "status", "policy_version", "sla_met",
            "latency_ms", "cost_usd")
# One statement per batch: the records go in as one JSON array and SQLite splits it (json_each). The sqlite3
# module releases the GIL around each statement step and binds parameters holding it, so executemany()
# handed the GIL back and forth with the event loop once per row; this costs one hand-off per batch.
_INSERT = (
    f"INSERT OR REPLACE INTO audit ({', '.join(_COLUMNS)}, record) "
    f"SELECT {', '.join(f'json_extract(value, {chr(39)}$.{c}{chr(39)})' for c in _COLUMNS)}, value FROM json_each(?)"
)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def _insert(conn: sqlite3.Connection, records: list[dict[str, Any]]) -> None:
    """One transaction and one statement per batch; runs in the writer thread, JSON encoding included."""
    payload = msgspec.json.encode(records).decode()
    conn.execute("BEGIN")
    try:
        conn.execute(_INSERT, (payload,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")



class SqliteSink:
    """One connection, used by one writer thread at a time (the writer awaits each batch)."""

    shared = False  # a file per replica

    def __init__(self, path: Path):
        self.path = path
        self.name = f"sqlite {path}"
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._conn = await asyncio.to_thread(_connect, self.path)

    async def write(self, records: list[dict[str, Any]]) -> None:
        if self._conn is None:
            self._conn = await asyncio.to_thread(_connect, self.path)
        await asyncio.to_thread(_insert, self._conn, records)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def reader(self) -> SqliteReader:
        return SqliteReader(self.path)


class SqliteReader(AuditReader):
    """Read-only: a connection per query (cheap for SQLite; safe from any thread)."""

    def __init__(self, path: Path):
        self.path = path
        self.name = f"sqlite {path}"

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
