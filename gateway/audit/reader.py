"""Read-only queries over the audit store, whichever it is (the CLI, the admin API, the simulator).

A reader runs SQL written once for both stores: `?` placeholders and the columns of the `audit` table; a store's
reader translates placeholders and turns its `record` column into a dict (`record()`).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["AuditReader"]


class AuditReader:
    name = "audit"

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def record(self, value) -> dict[str, Any]:
        return msgspec.json.decode(value)

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.rows("SELECT record FROM audit ORDER BY ts DESC LIMIT ?", (limit,))
        return [self.record(r[0]) for r in reversed(rows)]

    def get(self, record_id: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT record FROM audit WHERE id = ?", (record_id,))
        return self.record(rows[0][0]) if rows else None

    def count(self) -> int:
        rows = self.rows("SELECT COUNT(*) FROM audit")
        return rows[0][0] if rows else 0

    replica_field = "json_extract(record, '$.replica')"  # the record's `replica`, in this store's SQL

    def spend_since(self, day_start: float, month_start: float,
                    replica: str | None = None) -> dict[str, tuple[float, float]]:
        """{tenant: (spend since day_start, since month_start)}: what this log says was billed (by one replica's
        requests only, when given: a store several replicas share)."""
        mine, params = (f" AND {self.replica_field} = ?", (replica,)) if replica else ("", ())
        rows = self.rows("SELECT tenant, SUM(CASE WHEN ts >= ? THEN cost_usd ELSE 0 END), SUM(cost_usd) FROM audit "
                         f"WHERE ts >= ? AND cost_usd > 0{mine} GROUP BY tenant", (day_start, month_start, *params))
        return {tenant: (float(day or 0.0), float(month or 0.0)) for tenant, day, month in rows}

    def close(self) -> None:
        """Release connections (a no-op where there are none)."""
