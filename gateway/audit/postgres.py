"""One Postgres for every replica's audit (`audit.backend: postgres`), through psycopg 3.

Writes: an async connection pool; one statement per batch (the batch goes in as one JSON array and Postgres
splits it with jsonb_array_elements: a multi-row INSERT in one round trip), upserting by id. The schema is created
and migrated on start under an advisory lock (replicas starting together migrate once), versioned in
`imagegw_schema`; a Postgres that is away at start is migrated at the first write instead, and meanwhile the
writer keeps every record queued. Reads: a small synchronous pool, used from the admin API's worker threads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import psycopg
import psycopg_pool

from .reader import AuditReader

__all__ = ["SCHEMA_VERSION", "PostgresReader", "PostgresSink", "migrate"]

log = logging.getLogger(__name__)

_MIGRATIONS: tuple[str, ...] = (
    # 1: the audit table, as in SQLite; the record as jsonb for ops' own queries.
    """
    CREATE TABLE IF NOT EXISTS audit (
        id TEXT PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        tenant TEXT,
        backend TEXT,
        outcome TEXT NOT NULL,
        status INTEGER NOT NULL,
        policy_version TEXT,
        sla_met SMALLINT,
        latency_ms DOUBLE PRECISION,
        cost_usd DOUBLE PRECISION,
        record JSONB NOT NULL
    );
    CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
    CREATE INDEX IF NOT EXISTS audit_tenant_ts ON audit (tenant, ts);
    CREATE INDEX IF NOT EXISTS audit_backend_ts ON audit (backend, ts);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
_LOCK_ID = 0x1A6E_A0D1  # pg_advisory_xact_lock key: one replica migrates at a time

_COPIED = ("id", "ts", "tenant", "backend", "outcome", "status", "policy_version", "sla_met", "latency_ms",
           "cost_usd")
_INSERT = f"""
INSERT INTO audit ({", ".join(_COPIED)}, record)
SELECT r->>'id', (r->>'ts')::float8, r->>'tenant', r->>'backend', r->>'outcome', (r->>'status')::int,
       r->>'policy_version',
       CASE WHEN jsonb_typeof(r->'sla_met') = 'boolean' THEN (r->>'sla_met')::boolean::int END,
       (r->>'latency_ms')::float8, (r->>'cost_usd')::float8, r
FROM jsonb_array_elements(%s::jsonb) AS r
ON CONFLICT (id) DO UPDATE SET {", ".join(f"{c} = EXCLUDED.{c}" for c in _COPIED[1:])}, record = EXCLUDED.record
"""
# Errors that say "the database is not there right now": keep the batch and try again. Any other error is about
# the data; the batch is split to find the record at fault.
_AWAY = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


async def migrate(conn: psycopg.AsyncConnection) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        await conn.execute("CREATE TABLE IF NOT EXISTS imagegw_schema (component TEXT PRIMARY KEY, "
                           "version INTEGER NOT NULL, migrated_at DOUBLE PRECISION NOT NULL)")
        row = await (await conn.execute("SELECT version FROM imagegw_schema WHERE component = 'audit'")).fetchone()
        found = row[0] if row else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"the audit schema in Postgres is at version {found}, newer than this gateway's "
                               f"{SCHEMA_VERSION}: run the newer gateway, or a reader of that version")
        for sql in _MIGRATIONS[found:]:
            await conn.execute(sql)
        if found < SCHEMA_VERSION:
            await conn.execute("INSERT INTO imagegw_schema VALUES ('audit', %s, %s) ON CONFLICT (component) "
                               "DO UPDATE SET version = EXCLUDED.version, migrated_at = EXCLUDED.migrated_at",
                               (SCHEMA_VERSION, time.time()))
            log.info("audit schema in Postgres migrated from version %d to %d", found, SCHEMA_VERSION)
    return found


def _payload(records: list[dict[str, Any]]) -> str:
    data = msgspec.json.encode(records)
    if b"\\u0000" in data:  # jsonb refuses NUL in text (a client may send one in a prompt)
        data = msgspec.json.encode(_without_nul(records))
    return data.decode()


def _without_nul(value):
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


class PostgresSink:
    shared = True

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout_s: float = 5.0):
        self.name = "postgres"
        self._dsn = dsn  # a secret (it may hold a password): never logged
        self._pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout_s, name="imagegw-audit",
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout_s))})
        self._migrated = False
        self._reader: PostgresReader | None = None

    async def open(self) -> None:
        await self._pool.open(wait=False)
        try:
            await self._ensure_schema()
        except _AWAY as exc:
            log.error("audit: Postgres not reachable at start (%s); records stay queued until it is",
                      type(exc).__name__)

    async def _ensure_schema(self) -> None:
        if not self._migrated:
            async with self._pool.connection() as conn:
                await migrate(conn)
            self._migrated = True

    async def write(self, records: list[dict[str, Any]]) -> None:
        await self._ensure_schema()
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_INSERT, (_payload(records),))
        except _AWAY:
            raise
        except psycopg.Error as exc:
            if len(records) == 1:  # this record cannot be stored as it is: say so, keep the others moving
                log.error("audit record %s refused by Postgres (%s: %s); dropped", records[0].get("id"),
                          type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                return
            for record in records:
                await self.write([record])

    async def close(self) -> None:
        await self._pool.close()
        if self._reader is not None:
            self._reader.close()

    def reader(self) -> PostgresReader:
        if self._reader is None:
            self._reader = PostgresReader(self._dsn)
        return self._reader


class PostgresReader(AuditReader):
    replica_field = "record->>'replica'"

    def __init__(self, dsn: str, *, pool_size: int = 4):
        self.name = "postgres"
        self._pool = psycopg_pool.ConnectionPool(dsn, min_size=0, max_size=pool_size, open=True, timeout=5.0,
                                                 name="imagegw-audit-read",
                                                 kwargs={"autocommit": True, "connect_timeout": 5})

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
        except psycopg.errors.UndefinedTable:  # nothing written yet
            return []

    def record(self, value) -> dict[str, Any]:
        return value if isinstance(value, dict) else msgspec.json.decode(value)

    def close(self) -> None:
        self._pool.close()
