"""The audit log: one record per request, written off the request path in batches.

SQLite in WAL mode is the embedded default. `submit()` never blocks and never
drops: a background task drains the queue in batches, and `close()` flushes
everything still queued before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["AuditLog", "AuditReader"]

log = logging.getLogger(__name__)

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


class AuditLog:
    """Batched, background SQLite writer for audit records (plain dicts)."""

    def __init__(self, path: Path, *, batch_size: int = 256, flush_interval_s: float = 0.2):
        self.path = path
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        # A plain list and one event: the writer wakes once per flush interval, not once per record (an
        # asyncio.Queue woke it for every put: a task step per request on the event loop).
        self._pending: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task | None = None
        self._in_flight: tuple[list[dict[str, Any]], asyncio.Future] | None = None
        self.written = 0

    async def start(self) -> None:
        self._conn = await asyncio.to_thread(_connect, self.path)
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; returns at once."""
        self._pending.append(record)
        if len(self._pending) == 1:
            self._arrived.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if len(self._pending) < self._batch_size:
                await asyncio.sleep(self._flush_interval_s)  # let a batch gather
            batch = self._pending[:self._batch_size]
            del self._pending[:len(batch)]
            if not self._pending:
                self._arrived.clear()
            await self._write(batch)

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        # Shielded: close() may cancel the writer mid-batch; the thread finishes it and close() waits for it.
        self._in_flight = batch, asyncio.ensure_future(asyncio.to_thread(_insert, self._conn, batch))
        try:
            await asyncio.shield(self._in_flight[1])
            self.written += len(batch)
        except sqlite3.Error:
            # Keep the records: put them back and let the next round retry.
            log.exception("audit write failed; %d records re-queued", len(batch))
            self._pending[:0] = batch
            self._arrived.set()
            await asyncio.sleep(1.0)
        finally:
            if self._in_flight[1].done():
                self._in_flight = None

    async def close(self) -> None:
        """Stop the writer and flush every queued record (a batch being written is waited for)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        remaining, self._pending = self._pending, []
        if self._in_flight is not None:
            batch, write = self._in_flight
            self._in_flight = None
            try:
                await write
                self.written += len(batch)
            except sqlite3.Error:
                remaining = batch + remaining
        if remaining and self._conn is not None:
            _insert(self._conn, remaining)
            self.written += len(remaining)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class AuditReader:
    """Read-only queries over an audit file (CLI and admin API)."""

    def __init__(self, path: Path):
        self.path = path

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._rows("SELECT record FROM audit ORDER BY ts DESC LIMIT ?", (limit,))
        return [msgspec.json.decode(r[0]) for r in reversed(rows)]

    def get(self, record_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT record FROM audit WHERE id = ?", (record_id,))
        return msgspec.json.decode(rows[0][0]) if rows else None

    def count(self) -> int:
        rows = self._rows("SELECT COUNT(*) FROM audit")
        return rows[0][0] if rows else 0

    def spend_since(self, day_start: float, month_start: float) -> dict[str, tuple[float, float]]:
        """{tenant: (spend since day_start, since month_start)}: what this log says was billed."""
        rows = self._rows("SELECT tenant, SUM(CASE WHEN ts >= ? THEN cost_usd ELSE 0 END), SUM(cost_usd) FROM audit "
                          "WHERE ts >= ? AND cost_usd > 0 GROUP BY tenant", (day_start, month_start))
        return {tenant: (day or 0.0, month or 0.0) for tenant, day, month in rows}


_FILTERS = {
    "tenant": "tenant = ?", "backend": "backend = ?", "outcome": "outcome = ?",
    "policy_version": "policy_version = ?", "since": "ts >= ?", "until": "ts < ?",
}


def audit_query(reader: AuditReader, *, limit: int = 100, cursor: str | None = None,
                sla_missed: bool | None = None, **filters) -> tuple[list[dict[str, Any]], str | None]:
    """Records newest first matching the filters; the cursor continues where the page ended."""
    where, params = [], []
    for name, value in filters.items():
        if value is not None:
            where.append(_FILTERS[name])
            params.append(value)
    if sla_missed is not None:
        where.append("sla_met = ?" if sla_missed else "(sla_met = ? OR sla_met IS NULL)")
        params.append(0 if sla_missed else 1)
    if cursor:
        ts, _, rid = cursor.partition("~")
        where.append("(ts < ? OR (ts = ? AND id < ?))")
        params += [float(ts), float(ts), rid]
    sql = "SELECT record, ts, id FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
    rows = reader._rows(sql + " ORDER BY ts DESC, id DESC LIMIT ?", (*params, limit + 1))
    page = [msgspec.json.decode(r[0]) for r in rows[:limit]]
    next_cursor = f"{rows[limit - 1][1]!r}~{rows[limit - 1][2]}" if len(rows) > limit else None
    return page, next_cursor


def audit_stats(reader: AuditReader, since: float) -> list[dict[str, Any]]:
    """Per backend since a time: requests, images, cost per image, p50/p95 latency, SLA attainment, fallbacks."""
    rows = reader._rows("SELECT backend, latency_ms, cost_usd, sla_met, outcome, record FROM audit WHERE ts >= ?",
                        (since,))
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row[0] or "none", []).append(row)
    out = []
    for backend, items in sorted(groups.items()):
        latencies = sorted(r[1] for r in items if r[1] is not None)
        records = [msgspec.json.decode(r[5]) for r in items]
        images = sum(r.get("images") or 0 for r in records)
        cost = sum(r[2] or 0 for r in items)
        judged = [r[3] for r in items if r[3] is not None]
        out.append({
            "backend": backend, "requests": len(items), "ok": sum(1 for r in items if r[4] == "ok"),
            "images": images, "cost_usd": cost, "cost_per_image_usd": cost / images if images else None,
            "latency_ms": {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95)},
            "sla_attainment": sum(judged) / len(judged) if judged else None,
            "fallbacks": sum(1 for r in records if r.get("outcome") == "ok"
                             and (r.get("decision") or {}).get("chosen") not in (None, r.get("backend"))),
        })
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]
