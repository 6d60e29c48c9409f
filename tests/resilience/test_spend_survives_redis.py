"""Spend and budgets survive Redis: stopped, restarted empty, or slow, the books stay right to the cent."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import pytest
import redis.asyncio as aioredis

from gateway.state_redis import RedisStore

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed")


class PrivateRedis:
    """A redis-server of this test's own on a free port, to stop and start at will."""

    def __init__(self, folder):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.folder),
                        "--enable-debug-command", "local"], check=True)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() \
                    == b"PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:  # loses everything (no persistence)
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)


@pytest.fixture
def redis_server(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def store(server: PrivateRedis, replica: str) -> RedisStore:
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.3, socket_timeout=0.3)
    return RedisStore(client, "books", replica_id=replica)


async def spend_of(s: RedisStore, tenant: str = "acme") -> float:
    return (await s.spend(time.time())).get(tenant, {}).get("day", 0.0)


async def test_after_redis_restarts_empty_every_replicas_spend_comes_back_to_the_cent(redis_server):
    a, b = store(redis_server, "a"), store(redis_server, "b")
    now = time.time()
    for s, prices in ((a, [0.035, 0.024, 0.134]), (b, [0.04, 0.024])):
        for price in prices:
            res, _, _ = await s.reserve("acme", price, 100.0, None, now)
            await s.settle(res, price)
        await s.record_spend("beta", 0.01, now)  # no budget: counted too
        await s.tick(now)
    billed = 0.035 + 0.024 + 0.134 + 0.04 + 0.024
    assert await spend_of(a) == pytest.approx(billed, abs=1e-9)

    redis_server.stop()
    await a.reserve("acme", 0.5, 100.0, None, now)  # while it is down: on a's ledger
    res, _, _ = await b.reserve("acme", 0.25, 100.0, None, now)
    await b.settle(res, 0.2)  # settled below the reservation
    assert a.degraded and b.degraded
    redis_server.start()  # empty
    for s in (a, b):
        await s.tick(time.time())
        await s.tick(time.time())  # re-sending is idempotent
    assert not a.degraded and not b.degraded
    assert await spend_of(a) == pytest.approx(billed + 0.5 + 0.2, abs=1e-9)
    assert await spend_of(b, "beta") == pytest.approx(0.02, abs=1e-9)


async def test_concurrent_writes_of_one_replica_never_count_twice(redis_server):
    a = store(redis_server, "a")
    now = time.time()

    async def one():
        res, _, _ = await a.reserve("acme", 0.03, 1000.0, None, now)
        await a.settle(res, 0.02)

    await asyncio.gather(*(one() for _ in range(200)))
    await asyncio.gather(*(a.tick(now) for _ in range(5)))
    assert await spend_of(a) == pytest.approx(200 * 0.02, abs=1e-9)


async def test_with_redis_down_replicas_overspend_a_budget_by_at_most_one_price_each(redis_server):
    replicas = [store(redis_server, f"r{i}") for i in range(3)]
    now = time.time()
    for s in replicas:
        await s.tick(now)  # heartbeats: each knows there are three
    res, _, _ = await replicas[0].reserve("acme", 0.10, 1.00, None, now)
    await replicas[0].settle(res, 0.10)
    for s in replicas:
        await s.tick(now)
        await s.spend(now)  # each learns what the others spent
    redis_server.stop()
    granted = 0
    for _ in range(20):
        for s in replicas:
            res, _, _ = await s.reserve("acme", 0.07, 1.00, None, now)
            if res is not None:
                await s.settle(res, 0.07)
                granted += 1
    spent = 0.10 + granted * 0.07
    assert all(s.degraded for s in replicas)
    assert spent <= 1.00 + 3 * 0.07  # at most one request's price per replica over
    assert granted >= 9  # and the budget's room was still used (0.90 / 3 = 0.30 each: 4 at $0.07)
    redis_server.start()
    for s in replicas:
        await s.tick(time.time())
    assert await spend_of(replicas[1]) == pytest.approx(spent, abs=1e-9)


async def test_a_slow_answer_is_not_an_outage(redis_server, caplog):
    s = store(redis_server, "a")
    await s.tick(time.time())
    sleeper = subprocess.Popen(["redis-cli", "-p", str(redis_server.port), "debug", "sleep", "1.0"])
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await s.spend(time.time())  # one timeout (0.3 s): answered locally, not an outage
    assert time.monotonic() - started >= 0.25 and not s.degraded
    sleeper.wait()
    assert await spend_of(s) == 0.0 and not s.degraded
    assert "unreachable" not in caplog.text
