"""Every request leaves exactly one audit record, and a clean shutdown loses none."""

from __future__ import annotations

import asyncio

import httpx

from backends.errors import BackendTransientError
from gateway.audit import AuditLog, open_reader
from gateway.audit.sqlite import SqliteReader, SqliteSink
from policies.types import BackendKind
from tests.fakes import ScriptedBackend


def test_concurrent_requests_each_get_one_record_whatever_their_outcome(settings, shipped_policy, serve):
    flaky = ScriptedBackend("local", kind=BackendKind.LOCAL, delay_s=0.01, models=("tiny",),
                            fail=lambda job: BackendTransientError("boom") if job.seed == 13 else None)
    server = serve(settings, shipped_policy, {"local": flaky})
    bodies = (
        [{"prompt": f"ok {i}", "size": "256x256"} for i in range(40)]
        + [{"prompt": "fails", "size": "256x256", "seed": 13}] * 5  # backend error -> 502
        + [{"prompt": "x", "n": 0}] * 5  # invalid -> 400
        + [{"prompt": "huge", "size": "4096x4096"}] * 5  # no candidate -> 503
    )

    async def fire():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/images/generations", json=b) for b in bodies))

    responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 40 + [400] * 5 + [502] * 5 + [503] * 5
    ids = {r.headers.get("x-gateway-decision-id") for r in responses if r.status_code == 200}
    server.stop()

    reader = open_reader(settings)
    assert reader.count() == len(bodies)
    records = reader.recent(limit=100)
    assert ids <= {r["id"] for r in records}
    by_status = {}
    for r in records:
        by_status.setdefault(r["status"], []).append(r)
    assert all(r["attempts"][0]["error_class"] == "BackendTransientError" for r in by_status[502])
    assert all(r["decision"]["rejected"] for r in by_status[503])
    assert all(r["request"] is None and r["error"]["code"] for r in by_status[400])


async def test_close_flushes_everything_still_queued(tmp_path):
    log = AuditLog(SqliteSink(tmp_path / "a.sqlite3"), batch_size=10, flush_interval_s=60)
    await log.start()
    for i in range(1_000):
        log.submit({"id": f"r{i}", "ts": float(i), "outcome": "ok", "status": 200, "record": i})
    await log.close()
    assert SqliteReader(tmp_path / "a.sqlite3").count() == 1_000


async def test_writer_batches_in_the_background(tmp_path):
    log = AuditLog(SqliteSink(tmp_path / "a.sqlite3"), batch_size=50, flush_interval_s=0.01)
    await log.start()
    _submit(log, 120)
    assert await _written(log, 120, asyncio.sleep)
    assert SqliteReader(tmp_path / "a.sqlite3").count() == 120
    await log.close()


async def test_a_failed_write_keeps_its_records_and_the_next_round_writes_them(tmp_path, monkeypatch):
    import sqlite3

    import gateway.audit.sqlite as audit
    import gateway.audit.writer as writer

    real, failures = audit._insert, []

    def flaky(conn, records):
        if not failures:
            failures.append(len(records))
            raise sqlite3.OperationalError("database is locked")
        real(conn, records)

    monkeypatch.setattr(audit, "_insert", flaky)
    monkeypatch.setattr(writer.asyncio, "sleep", _fast_sleep)
    log = AuditLog(SqliteSink(tmp_path / "a.sqlite3"), batch_size=50, flush_interval_s=0.01)
    await log.start()
    _submit(log, 30)
    assert await _written(log, 30, _fast_sleep) and failures
    await log.close()
    assert SqliteReader(tmp_path / "a.sqlite3").count() == 30


async def test_close_during_a_write_waits_for_it_and_loses_nothing(tmp_path, monkeypatch):
    import threading

    import gateway.audit.sqlite as audit

    real, entered, release = audit._insert, threading.Event(), threading.Event()

    def slow(conn, records):
        entered.set()
        release.wait(5)
        real(conn, records)

    monkeypatch.setattr(audit, "_insert", slow)
    log = AuditLog(SqliteSink(tmp_path / "a.sqlite3"), batch_size=10, flush_interval_s=0.001)
    await log.start()
    _submit(log, 25)
    await asyncio.to_thread(entered.wait, 5)  # the first batch is in the writer thread
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0.05)
    release.set()
    await closing
    assert SqliteReader(tmp_path / "a.sqlite3").count() == 25


_real_sleep = asyncio.sleep


def _submit(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.submit({"id": f"r{i}", "ts": float(i), "outcome": "ok", "status": 200})


async def _written(log: AuditLog, n: int, sleep, polls: int = 200) -> bool:
    """Waits (up to `polls` short sleeps) until the writer reports `n` records written."""
    for _ in range(polls):
        if log.written == n:
            return True
        await sleep(0.01)
    return log.written == n


async def _fast_sleep(seconds):
    await _real_sleep(min(seconds, 0.001))


def test_request_ids_are_uuid7_and_sort_by_time():
    import time
    import uuid

    from gateway.service import time_ordered_id

    first = time_ordered_id()
    time.sleep(0.002)
    ids = [time_ordered_id() for _ in range(100)]
    assert all(uuid.UUID(i).version == 7 and len(i) == 32 for i in ids)
    assert len(set(ids)) == 100 and first < min(ids)


def test_audit_tail_prints_recent_records(settings, shipped_policy, serve, capsys, monkeypatch):
    from gateway.cli import main

    server = serve(settings, shipped_policy, {"local": ScriptedBackend("local", kind=BackendKind.LOCAL)})
    httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "x", "size": "256x256"})
    server.stop()
    monkeypatch.setenv("IMAGEGW_DATA_DIR", str(settings.data_dir))
    assert main(["audit", "tail", "--config", str(settings.config_dir), "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert "200 local" in out and "min_cost" in out


def test_the_audit_says_how_long_the_pool_may_hold_a_job_before_its_fallback_must_start(
        settings, shipped_policy, serve):
    local = ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",))
    server = serve(settings, shipped_policy, {"local": local, "reve": ScriptedBackend("reve")})
    r = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a fox", "size": "256x256"},
                   timeout=30)
    assert r.status_code == 200
    server.stop()
    record = open_reader(settings).recent(limit=1)[0]
    first, second = record["decision"]["candidates"][:2]
    assert (first["backend"], second["backend"]) == ("local", "reve")
    reve = shipped_policy.backends["reve"].latency_prior  # no outcomes yet: the prior
    p99 = reve.p50_ms * (reve.p95_ms / reve.p50_ms) ** (2.326 / 1.645)
    assert first["start_within_ms"] == round(max(0.0, record["decision"]["sla_ms"] - p99), 1)
    assert "start_within_ms" not in second
