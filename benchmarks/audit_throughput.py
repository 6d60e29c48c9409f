"""Audit rows/s on one replica: the same records through the same batching writer into SQLite and into Postgres,
side by side in one run. Records are shaped like the gateway's (a decision with five candidates, one attempt).

    .venv/bin/python benchmarks/audit_throughput.py [--records 50000] [--dsn "host=127.0.0.1 dbname=test user=postgres"]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.audit import AuditLog  # noqa: E402
from gateway.audit.postgres import PostgresSink  # noqa: E402
from gateway.audit.sqlite import SqliteSink  # noqa: E402


def record(i: int) -> dict:
    candidates = [{"backend": b, "predicted_p95_ms": 900.0 + j, "cost_usd": 0.004 * j, "rejected": None}
                  for j, b in enumerate(("local", "seedream", "gemini", "reve", "bria"))]
    return {"id": uuid.uuid4().hex, "ts": time.time(), "tenant": f"tenant-{i % 20}", "backend": "local",
            "outcome": "ok", "status": 200, "policy_version": "3", "sla_met": True, "latency_ms": 1000.0 + i % 97,
            "cost_usd": 0.0005, "images": 1,
            "request": {"prompt": "a red fox in snow, golden hour, 35mm", "size": "1024x1024", "n": 1,
                        "tier": "standard"},
            "decision": {"chosen": "local", "reason": "cheapest predicted to meet the SLA", "candidates": candidates},
            "attempts": [{"backend": "local", "ms": 1000.0, "ok": True}]}


async def measure(sink, n: int, batch: int) -> float:
    log = AuditLog(sink, batch_size=batch, flush_interval_s=0.05)
    await log.start()
    records = [record(i) for i in range(n)]
    started = time.perf_counter()
    for r in records:
        log.submit(r)
    while log.written < n:
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    await log.close()
    return n / seconds


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=256, help="audit.batch_size")
    p.add_argument("--dsn", default="host=127.0.0.1 port=5432 dbname=test user=postgres")
    args = p.parse_args()
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lite = await measure(SqliteSink(Path(tmp) / "a.sqlite3"), args.records, args.batch)
        pg = await measure(PostgresSink(f"{args.dsn} options='-csearch_path={schema}'"), args.records, args.batch)
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"\n$ python benchmarks/audit_throughput.py --records {args.records} --batch {args.batch}")
    print(f"| store | rows/s ({args.records} records, batches of {args.batch}) |\n|---|---|")
    print(f"| sqlite (WAL, one file) | {lite:,.0f} |\n| postgres (one server, jsonb) | {pg:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
