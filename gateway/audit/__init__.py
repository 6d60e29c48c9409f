"""The audit log: one record per request, written off the request path in batches, to SQLite (embedded default)
or to one Postgres shared by every replica (`audit.backend: postgres`).

`open_audit(settings)` builds the writer for the configured store; `open_reader(settings)` a reader over it (the
CLI, the admin API and the simulator read through it, whichever store it is).
"""

from __future__ import annotations

from .queries import audit_query, audit_stats
from .reader import AuditReader
from .writer import AuditLog

__all__ = ["AuditLog", "AuditReader", "audit_query", "audit_stats", "open_audit", "open_reader"]


def open_audit(settings) -> AuditLog:
    a = settings.audit
    if a.backend == "postgres":
        from .postgres import PostgresSink

        sink = PostgresSink(a.dsn_value(), pool_size=a.pool_size)
    else:
        from .sqlite import SqliteSink

        sink = SqliteSink(settings.resolve(a.path))
    return AuditLog(sink, batch_size=a.batch_size, flush_interval_s=a.flush_interval_s)


def open_reader(settings) -> AuditReader:
    a = settings.audit
    if a.backend == "postgres":
        from .postgres import PostgresReader

        return PostgresReader(a.dsn_value())
    from .sqlite import SqliteReader

    return SqliteReader(settings.resolve(a.path))
