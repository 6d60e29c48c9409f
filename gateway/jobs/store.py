"""Durable jobs and idempotency keys, in SQLite (embedded, one replica) or in the fleet's Postgres (every replica
sees every job): one table of jobs, claimed under a lease, and one of remembered answers.

SQL is written once (`?` placeholders); a `_Db` runs it on its store. Every method is blocking: callers run them
in worker threads (`JobStore` below wraps them for asyncio).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["Claimed", "JobStore", "open_job_store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    body {blob} NOT NULL,
    webhook_url TEXT,
    idempotency_key TEXT,
    fingerprint TEXT,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    lease_owner TEXT,
    lease_until {real},
    runs INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    backend TEXT,
    cost_usd {real},
    decision_id TEXT,
    webhook_state TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at {real},
    webhook_error TEXT,
    finished_at {real},
    not_before {real}
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, lease_until);
CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs (webhook_state, webhook_next_at);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    headers TEXT,
    body {blob},
    created_at {real} NOT NULL,
    PRIMARY KEY (tenant, key)
);
"""
_JOB_VIEW = "id, tenant, status, webhook_url, created_at, updated_at, result, error, backend, cost_usd, " \
            "decision_id, runs, webhook_state, finished_at, not_before"


@dataclass(frozen=True, slots=True)
class Claimed:
    id: str
    tenant: str
    body: bytes
    created_at: float
    runs: int


class _Db:
    """Runs the shared SQL on one store."""

    skip_locked = ""

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def script(self, sql: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Sqlite(_Db):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()  # one connection, many worker threads

    def execute(self, sql, params=()):
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def script(self, sql):
        with self._lock:
            self._conn.executescript(sql.format(blob="BLOB", real="REAL"))

    def close(self):
        # Under the lock: a worker thread of a cancelled task may still be running a statement (closing the
        # connection under it crashes the process); after this, statements raise ProgrammingError.
        with self._lock:
            self._conn.close()


class _Postgres(_Db):
    skip_locked = " FOR UPDATE SKIP LOCKED"  # replicas claiming at once take different jobs

    def __init__(self, dsn: str):
        import psycopg_pool

        self._pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=8, open=True, timeout=5.0,
                                                 name="imagegw-jobs", kwargs={"autocommit": True,
                                                                              "connect_timeout": 5})

    def execute(self, sql, params=()):
        with self._pool.connection() as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def script(self, sql):
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x1A6E_A0D2,))
            conn.execute(sql.format(blob="BYTEA", real="DOUBLE PRECISION"))

    def close(self):
        self._pool.close()


class JobStore:
    """Async façade: each call runs its SQL in a worker thread."""

    def __init__(self, db: _Db, *, lease_s: float, idempotency_ttl_s: float = 86_400.0):
        self._db = db
        self.lease_s = lease_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self._ready = False

    def _execute(self, sql: str, params: tuple) -> list[tuple]:
        if not self._ready:  # created at first use: a store away at start-up is retried, not fatal
            self._db.script(_SCHEMA)
            self._ready = True
        return self._db.execute(sql, params)

    async def _run(self, sql: str, params: tuple = ()) -> list[tuple]:
        return await asyncio.to_thread(self._execute, sql, params)

    # --- jobs -------------------------------------------------------------------------------------------
    async def add(self, job_id: str, tenant: str, body: bytes, webhook_url: str | None, key: str | None,
                  fingerprint: str | None, now: float) -> tuple[dict, bool]:
        """Store a queued job; with an idempotency key already used by this tenant, the job it made (and
        False). Raises ValueError when that key came with another body."""
        if key is not None:
            found = await self._run(f"SELECT {_JOB_VIEW}, fingerprint FROM jobs WHERE tenant = ? AND "
                                    "idempotency_key = ? AND created_at >= ?",
                                    (tenant, key, now - self.idempotency_ttl_s))
            if found:
                if found[0][-1] != fingerprint:
                    raise ValueError("another body")
                return _view(found[0][:-1]), False
            # An expired key may be used again: the old job keeps its row, without the key.
            await self._run("UPDATE jobs SET idempotency_key = NULL WHERE tenant = ? AND idempotency_key = ?",
                            (tenant, key))
        try:
            await self._run("INSERT INTO jobs (id, tenant, status, body, webhook_url, idempotency_key, fingerprint, "
                            "created_at, updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                            (job_id, tenant, body, webhook_url, key, fingerprint, now, now))
        except Exception as exc:  # the same key raced in from another request: answer with that job
            if key is None or not _duplicate_key(exc):
                raise
            return await self.add(job_id, tenant, body, webhook_url, key, fingerprint, now)
        # The row as inserted (a runner may have claimed it already: the answer says what was accepted).
        return _view((job_id, tenant, "queued", webhook_url, now, now, None, None, None, None, None, 0, None,
                      None, None)), True

    async def get(self, job_id: str, tenant: str | None = None) -> dict | None:
        rows = await self._run(f"SELECT {_JOB_VIEW} FROM jobs WHERE id = ?", (job_id,))
        if not rows or (tenant is not None and rows[0][1] != tenant):
            return None  # another tenant's job is not found, not forbidden: ids are not leaked
        return _view(rows[0])

    async def claim(self, owner: str, now: float) -> Claimed | None:
        """The oldest queued job, or one whose runner stopped renewing its lease (a replica that died)."""
        rows = await self._run(
            "UPDATE jobs SET status = 'running', lease_owner = ?, lease_until = ?, runs = runs + 1, updated_at = ? "
            "WHERE id = (SELECT id FROM jobs WHERE (status = 'queued' AND (not_before IS NULL OR not_before <= ?)) "
            "OR (status = 'running' AND lease_until < ?) "
            f"ORDER BY created_at LIMIT 1{self._db.skip_locked}) "
            "RETURNING id, tenant, body, created_at, runs", (owner, now + self.lease_s, now, now, now))
        if not rows:
            return None
        r = rows[0]
        return Claimed(r[0], r[1], bytes(r[2]), r[3], r[4])

    async def renew(self, job_id: str, owner: str, now: float) -> str | None:
        """Extend the lease; returns the job's status (cancelled: stop), None when it is no longer ours."""
        rows = await self._run("UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? "
                               "RETURNING status", (now + self.lease_s, job_id, owner))
        return rows[0][0] if rows else None

    async def finish(self, job_id: str, owner: str, status: str, now: float, *, result: list | None = None,
                     error: dict | None = None, backend: str | None = None, cost_usd: float | None = None,
                     decision_id: str | None = None) -> bool:
        """Record a running job's end (not if it was cancelled or taken over meanwhile); queue its webhook."""
        rows = await self._run(
            "UPDATE jobs SET status = ?, result = ?, error = ?, backend = ?, cost_usd = ?, decision_id = ?, "
            "updated_at = ?, finished_at = ?, lease_until = NULL, "
            "webhook_state = CASE WHEN webhook_url IS NULL THEN NULL ELSE 'pending' END, webhook_next_at = ? "
            "WHERE id = ? AND lease_owner = ? AND status = 'running' RETURNING id",
            (status, _json(result), _json(error), backend, cost_usd, decision_id, now, now, now, job_id, owner))
        return bool(rows)

    async def hold(self, job_id: str, owner: str, until: float, now: float) -> None:
        """Back to the queue until `until` (waiting for idle pool capacity); that claim not counted as a run."""
        await self._run("UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, runs = runs - 1, "
                        "not_before = ?, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'",
                        (until, now, job_id, owner))

    async def requeue(self, job_id: str, owner: str, now: float) -> None:
        """A job this replica was running when it shut down: back to the queue, and that run not counted."""
        await self._run("UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, runs = runs - 1, "
                        "updated_at = ? WHERE id = ? AND lease_owner = ? AND status = 'running'", (now, job_id, owner))

    async def cancel(self, job_id: str, tenant: str, now: float) -> dict | None:
        await self._run("UPDATE jobs SET status = 'cancelled', updated_at = ?, finished_at = ? "
                        "WHERE id = ? AND tenant = ? AND status IN ('queued', 'running')",
                        (now, now, job_id, tenant))
        return await self.get(job_id, tenant)

    # --- webhooks ---------------------------------------------------------------------------------------
    async def due_webhooks(self, now: float, hold_s: float, limit: int = 16) -> list[dict]:
        """Webhooks due now, each held for hold_s so that no other replica sends it meanwhile."""
        rows = await self._run(
            "UPDATE jobs SET webhook_next_at = ? WHERE id IN (SELECT id FROM jobs WHERE webhook_state = 'pending' "
            f"AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT {int(limit)}{self._db.skip_locked}) "
            f"RETURNING {_JOB_VIEW}, webhook_attempts", (now + hold_s, now))
        return [_view(r[:-1]) | {"webhook_attempts": r[-1]} for r in rows]

    async def webhook_done(self, job_id: str, state: str, attempts: int, next_at: float | None,
                           error: str | None) -> None:
        await self._run("UPDATE jobs SET webhook_state = ?, webhook_attempts = ?, webhook_next_at = ?, "
                        "webhook_error = ? WHERE id = ?", (state, attempts, next_at, error, job_id))

    # --- idempotency keys of the synchronous route ------------------------------------------------------
    async def remember(self, tenant: str, key: str, fingerprint: str, now: float,
                       pending_for_s: float) -> tuple[str, Any]:
        """("new", None): go ahead (the key is now held); ("replay", (status, headers, body)); ("busy", None):
        the first request with this key is still running; ("mismatch", None): the key came with another body."""
        await self._run("DELETE FROM idempotency WHERE tenant = ? AND key = ? AND (created_at < ? OR "
                        "(state = 'pending' AND created_at < ?))",
                        (tenant, key, now - self.idempotency_ttl_s, now - pending_for_s))
        try:
            await self._run("INSERT INTO idempotency (tenant, key, fingerprint, state, created_at) "
                            "VALUES (?, ?, ?, 'pending', ?)", (tenant, key, fingerprint, now))
            return "new", None
        except Exception as exc:
            if not _duplicate_key(exc):
                raise
        rows = await self._run("SELECT fingerprint, state, status, headers, body FROM idempotency "
                               "WHERE tenant = ? AND key = ?", (tenant, key))
        if not rows:
            return await self.remember(tenant, key, fingerprint, now, pending_for_s)
        found, state, status, headers, body = rows[0]
        if found != fingerprint:
            return "mismatch", None
        if state == "pending":
            return "busy", None
        return "replay", (status, msgspec.json.decode(headers), bytes(body))

    async def answered(self, tenant: str, key: str, status: int, headers: dict, body: bytes) -> None:
        await self._run("UPDATE idempotency SET state = 'done', status = ?, headers = ?, body = ? "
                        "WHERE tenant = ? AND key = ?", (status, _json(headers), body, tenant, key))

    async def forget(self, tenant: str, key: str) -> None:
        """The request failed: nothing was charged, so a retry with the key runs again."""
        await self._run("DELETE FROM idempotency WHERE tenant = ? AND key = ? AND state = 'pending'", (tenant, key))

    def close(self) -> None:
        self._db.close()


def _duplicate_key(exc: Exception) -> bool:
    """A unique constraint refused the row (SQLite's IntegrityError and Postgres's UniqueViolation say so)."""
    text = str(exc).lower()
    return "unique" in text or "duplicate" in text


def _json(value) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def _view(row: tuple) -> dict:
    (job_id, tenant, status, webhook_url, created, updated, result, error, backend, cost, decision_id, runs,
     webhook_state, finished, not_before) = row
    return {"id": job_id, "tenant": tenant, "status": status, "webhook_url": webhook_url, "created_at": created,
            "updated_at": updated, "data": msgspec.json.decode(result) if result else None,
            "error": msgspec.json.decode(error) if error else None, "backend": backend, "cost_usd": cost,
            "decision_id": decision_id, "runs": runs, "webhook_state": webhook_state, "finished_at": finished,
            "held_until": not_before if status == "queued" else None}


def open_job_store(settings) -> JobStore:
    j = settings.jobs
    use_postgres = j.store == "postgres" or (j.store == "auto" and settings.audit.backend == "postgres")
    if use_postgres and not settings.audit.dsn_value():
        raise ValueError("jobs.store postgres uses audit.dsn: set it (or IMAGEGW_AUDIT__DSN)")
    db = _Postgres(settings.audit.dsn_value()) if use_postgres else _Sqlite(settings.resolve(j.path))
    return JobStore(db, lease_s=j.lease_s, idempotency_ttl_s=j.idempotency_ttl_s)
