"""Queries over any audit store: a page of records with filters and a cursor; per-backend stats."""

from __future__ import annotations

from typing import Any

from .reader import AuditReader

__all__ = ["audit_query", "audit_stats"]

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
            params.append(str(value) if name == "policy_version" else value)  # a text column in every store
    if sla_missed is not None:
        where.append("sla_met = ?" if sla_missed else "(sla_met = ? OR sla_met IS NULL)")
        params.append(0 if sla_missed else 1)
    if cursor:
        ts, _, rid = cursor.partition("~")
        where.append("(ts < ? OR (ts = ? AND id < ?))")
        params += [float(ts), float(ts), rid]
    sql = "SELECT record, ts, id FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
    rows = reader.rows(sql + " ORDER BY ts DESC, id DESC LIMIT ?", (*params, limit + 1))
    page = [reader.record(r[0]) for r in rows[:limit]]
    next_cursor = f"{rows[limit - 1][1]!r}~{rows[limit - 1][2]}" if len(rows) > limit else None
    return page, next_cursor


def audit_stats(reader: AuditReader, since: float, drift_warn: float = 0.1) -> list[dict[str, Any]]:
    """Per backend since a time: requests, images, cost per image (settled, and as predicted when chosen, with
    a warning past `drift_warn`), p50/p95 latency, SLA attainment, fallbacks."""
    rows = reader.rows("SELECT backend, latency_ms, cost_usd, sla_met, outcome, record FROM audit WHERE ts >= ?",
                        (since,))
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row[0] or "none", []).append(row)
    out = []
    for backend, items in sorted(groups.items()):
        latencies = sorted(float(r[1]) for r in items if r[1] is not None)
        records = [reader.record(r[5]) for r in items]
        images = sum(r.get("images") or 0 for r in records)
        cost = float(sum(r[2] or 0 for r in items))
        judged = [r[3] for r in items if r[3] is not None]
        out.append({
            "backend": backend, "requests": len(items), "ok": sum(1 for r in items if r[4] == "ok"),
            "images": images, "cost_usd": cost, "cost_per_image_usd": cost / images if images else None,
            "latency_ms": {"p50": _pct(latencies, 0.5), "p95": _pct(latencies, 0.95)},
            "sla_attainment": sum(judged) / len(judged) if judged else None,
            "cost_saved_usd": float(sum(r.get("cost_saved_usd") or 0 for r in records)),  # cached answers
            **_drift(records, drift_warn),
            "fallbacks": sum(1 for r in records if r.get("outcome") == "ok"
                             and (r.get("decision") or {}).get("chosen") not in (None, r.get("backend"))),
        })
    return out


def _drift(records: list[dict], warn: float) -> dict[str, Any]:
    """Settled against predicted cost over the requests that carry both (served ones)."""
    both = [r for r in records if r.get("outcome") == "ok" and r.get("cost_predicted_usd") is not None]
    predicted = float(sum(r["cost_predicted_usd"] for r in both))
    settled = float(sum(r.get("cost_usd") or 0 for r in both))
    drift = settled / predicted - 1 if predicted > 0 else None
    out: dict[str, Any] = {"cost_predicted_usd": predicted, "cost_drift": drift}
    if drift is not None and abs(drift) > warn:
        out["warning"] = (f"settled cost {drift:+.0%} against predicted over {len(both)} requests: the price list "
                          "(policy backends.<name>.prices / billed) may be out of date")
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]
