"""`audit.backend: postgres`: every replica's records in one Postgres, read back exactly as from SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import psycopg
import pytest

from gateway.audit import AuditLog, audit_query, audit_stats, open_reader
from gateway.audit.postgres import SCHEMA_VERSION, PostgresReader, PostgresSink
from gateway.audit.sqlite import SqliteReader, SqliteSink
from tests.conftest import POSTGRES_DSN, free_port


def _records(n: int, replica: str) -> list[dict]:
    return [{"id": f"{replica}-{i:04d}", "ts": 1_700_000_000.0 + i + (0.5 if replica == "b" else 0.0),
             "tenant": f"t{i % 3}", "backend": ("local", "reve", "bria")[i % 3], "outcome": "ok" if i % 5 else "error",
             "status": 200 if i % 5 else 502, "policy_version": str(1 + i % 2),
             "sla_met": (i % 4 != 0) if i % 5 else None,
             "latency_ms": 100.0 + i, "cost_usd": 0.01 * (i % 3), "images": 1,
             "decision": {"chosen": "local", "reason": "cheapest"}, "replica": replica} for i in range(n)]


async def _write(sink, records) -> None:
    log = AuditLog(sink, batch_size=64, flush_interval_s=0.01)
    await log.start()
    for r in records:
        log.submit(r)
    await log.close()
    assert log.written == len(records)


async def test_two_replicas_write_to_one_postgres_and_every_query_reads_as_it_does_from_sqlite(postgres_dsn, tmp_path):
    a, b = _records(150, "a"), _records(150, "b")
    await asyncio.gather(_write(PostgresSink(postgres_dsn), a), _write(PostgresSink(postgres_dsn), b))
    await _write(SqliteSink(tmp_path / "a.sqlite3"), a + b)
    pg, lite = PostgresReader(postgres_dsn), SqliteReader(tmp_path / "a.sqlite3")
    try:
        assert pg.count() == lite.count() == 300
        assert pg.recent(5) == lite.recent(5)
        assert pg.get("b-0042") == lite.get("b-0042") == b[42]
        spend_pg, spend_lite = (r.spend_since(1_700_000_100, 1_700_000_000) for r in (pg, lite))
        assert spend_pg.keys() == spend_lite.keys() and all(
            spend_pg[t] == pytest.approx(spend_lite[t]) for t in spend_lite)
        # A restarted replica restores its own spend, not the fleet's (its books are its own totals).
        only_a = {t: sum(r["cost_usd"] for r in a if r["tenant"] == t) for t in ("t1", "t2")}
        assert {t: m for t, (_, m) in pg.spend_since(2e9, 0, replica="a").items()} == pytest.approx(only_a)
        for filters in ({}, {"tenant": "t1"}, {"backend": "reve", "outcome": "ok"}, {"policy_version": 2},
                        {"sla_missed": True}, {"sla_missed": False},
                        {"since": 1_700_000_050.0, "until": 1_700_000_090.0}):
            pages = []
            for reader in (pg, lite):
                out, cursor = [], None
                while True:
                    page, cursor = audit_query(reader, limit=40, cursor=cursor, **filters)
                    out += [r["id"] for r in page]
                    if cursor is None:
                        break
                pages.append(out)
            assert pages[0] == pages[1] and pages[0], filters
        for row_pg, row_lite in zip(audit_stats(pg, 0), audit_stats(lite, 0), strict=True):
            assert row_pg.pop("cost_usd") == pytest.approx(row_lite.pop("cost_usd"))
            assert row_pg.pop("cost_per_image_usd") == pytest.approx(row_lite.pop("cost_per_image_usd"))
            assert row_pg == row_lite
    finally:
        pg.close()


async def test_the_schema_is_created_once_versioned_and_a_newer_one_is_refused_with_a_clear_error(postgres_dsn):
    await _write(PostgresSink(postgres_dsn), _records(3, "a"))
    await _write(PostgresSink(postgres_dsn), _records(3, "b"))  # a second start migrates nothing
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM imagegw_schema WHERE component = 'audit'").fetchall() == \
            [(SCHEMA_VERSION,)]
        conn.execute("UPDATE imagegw_schema SET version = version + 1")
    sink = PostgresSink(postgres_dsn)
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        await sink.open()
    await sink.close()


async def test_a_record_postgres_cannot_store_as_is_is_stored_cleaned_and_never_blocks_the_rest(postgres_dsn):
    records = _records(4, "a")
    records[1]["request"] = {"prompt": "nul \x00 inside"}  # jsonb refuses NUL; a fuzzer sends one
    await _write(PostgresSink(postgres_dsn), records)
    reader = PostgresReader(postgres_dsn)
    try:
        assert reader.count() == 4
        assert reader.get("a-0001")["request"]["prompt"] == "nul \ufffd inside"
    finally:
        reader.close()


class _Proxy:
    """A TCP proxy to the real Postgres that the test opens and closes: Postgres away, then back."""

    def __init__(self):
        self.port = free_port()
        self.server = None

    async def _pipe(self, reader, writer):
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, client_r, client_w):
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", 5432)
        await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))

    async def open(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self):
        self.server.close()


async def test_records_written_while_postgres_is_away_are_kept_and_land_once_it_is_back(postgres_dsn, caplog):
    proxy = _Proxy()
    dsn = postgres_dsn.replace("port=5432", f"port={proxy.port}")
    log = AuditLog(PostgresSink(dsn, connect_timeout_s=1), batch_size=16, flush_interval_s=0.01,
                   retry_interval_s=0.1)
    with caplog.at_level(logging.ERROR):
        await log.start()  # nothing listens: the gateway still starts
        for r in _records(40, "a"):
            log.submit(r)
        for _ in range(100):
            if log.failures:
                break
            await asyncio.sleep(0.05)
    assert log.failures and log.written == 0
    assert "password" not in caplog.text.lower() and "queued again" in caplog.text
    await proxy.open()
    for _ in range(200):
        if log.written == 40:
            break
        await asyncio.sleep(0.05)
    await log.close()
    await proxy.close()
    assert log.written == 40
    reader = PostgresReader(postgres_dsn)
    try:
        assert reader.count() == 40
    finally:
        reader.close()


def test_a_gateway_on_postgres_audits_every_request_and_its_admin_api_reads_them(settings, shipped_policy, serve,
                                                                                postgres_dsn, monkeypatch):
    from gateway.settings import AuditSettings

    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "k")
    settings.audit = AuditSettings(backend="postgres", dsn=postgres_dsn, flush_interval_s=0.02)
    server = serve(settings, shipped_policy)
    ids = []
    for i in range(5):
        r = httpx.post(server.base_url + "/v1/images/generations", json={"prompt": f"fox {i}", "size": "64x64"},
                       timeout=60)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-gateway-decision-id"])
    bad = httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "x", "n": 0}, timeout=10)
    assert bad.status_code == 400
    server.stop()
    reader = open_reader(settings)
    try:
        assert reader.count() == 6
        assert {r["id"] for r in reader.recent(10)} >= set(ids)
    finally:
        reader.close()
    server = serve(settings, shipped_policy)  # a restart reads the same database
    auth = {"authorization": "Bearer k"}
    page = httpx.get(server.base_url + "/admin/audit", params={"limit": 3}, headers=auth, timeout=10).json()
    assert len(page["data"]) == 3 and page["next_cursor"]
    one = httpx.get(server.base_url + f"/admin/audit/{ids[0]}", headers=auth, timeout=10).json()
    assert one["id"] == ids[0] and one["decision"]["chosen"]
    stats = httpx.get(server.base_url + "/admin/stats", params={"window_s": 3600}, headers=auth, timeout=10).json()
    assert sum(b["requests"] for b in stats["backends"]) == 6


def test_postgres_without_a_dsn_is_a_config_error_naming_the_field():
    from pydantic import ValidationError

    from gateway.settings import AuditSettings

    with pytest.raises(ValidationError, match="audit.dsn is required"):
        AuditSettings(backend="postgres")
    assert POSTGRES_DSN  # the suite's server


def test_the_dsn_and_its_password_are_secrets_scrubbed_from_logs_and_errors(settings):
    from gateway.app import _redactor
    from gateway.settings import AuditSettings

    settings.audit = AuditSettings(backend="postgres", dsn="postgresql://audit:s3cret-pw@db.internal:5432/audit")
    scrub = _redactor(settings)
    assert "s3cret-pw" not in scrub("connection to db.internal failed for audit:s3cret-pw")
    assert "s3cret-pw" not in repr(settings.audit)  # a SecretStr: config dumps and tracebacks show ***
