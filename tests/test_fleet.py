"""The pool's workers on other hosts: `imagegw worker` processes serve a gateway with no workers of its own
through real Redis Streams; a worker killed mid-batch has its batch finished by another."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from gateway.audit import open_reader
from gateway.config import load_policy, load_settings
from gateway.jobs.webhooks import verify
from tests.conftest import ROOT
from tests.test_jobs import Receiver
from tests.test_jobs import _wait as _wait_job


@pytest.fixture
def fleet_config(tmp_path, monkeypatch, postgres_dsn):
    for key in [k for k in os.environ if k.startswith("IMAGEGW_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(ROOT / "config" / "policy.yaml", config / "policy.yaml")
    namespace = f"fleet{uuid.uuid4().hex[:8]}"
    (config / "gateway.yaml").write_text(json.dumps({
        "data_dir": str(tmp_path / "data"), "redis_url": "redis://127.0.0.1:6379/0", "redis_namespace": namespace,
        "sandbox": {"mode": "off"},
        "audit": {"backend": "postgres", "dsn": postgres_dsn, "flush_interval_s": 0.02},  # jobs live there too
        "jobs": {"webhook_allow_http": True, "webhook_allow_private": True, "poll_interval_s": 0.05},
        "local": {"preset": "tiny", "devices": ["cpu"], "compile": False, "workers": "remote",
                  "remote_reclaim_s": 2.0, "max_wait_ms": 20,
                  "warm_shapes": [{"width": 256, "height": 256, "steps": 4, "batch_sizes": [1]}]},
    }))
    yield config
    client = redis.Redis()
    for key in client.scan_iter(match=f"imagegw:{namespace}:*"):
        client.delete(key)


def _worker(config: Path, name: str, tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGW_")}
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker", "--config", str(config), "--id", name],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_workers(base_url: str, n: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        local = next(b for b in httpx.get(base_url + "/v1/backends", timeout=5).json()["data"] if b["name"] == "local")
        if local["health"] == "ok" and local["detail"].startswith(f"{n} worker(s) ready"):
            return local
        time.sleep(0.2)
    raise AssertionError(f"{n} remote workers never became ready: {local}")


def _busy_worker(namespace: str) -> str | None:
    client = redis.Redis()
    for key in client.scan_iter(match=f"imagegw:{namespace}:pool:worker:*"):
        beat = json.loads(client.get(key) or b"{}")
        if beat.get("busy"):
            return beat["id"]
    return None


def test_a_gateway_without_workers_serves_the_fleets_pool_and_a_killed_workers_job_is_finished_by_another(
        fleet_config, serve, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "fleet-admin")
    settings = load_settings(fleet_config)
    workers = {name: _worker(fleet_config, name, tmp_path) for name in ("wa", "wb")}
    try:
        server = serve(settings, load_policy(settings))
        _wait_workers(server.base_url, 2)
        quick = httpx.post(server.base_url + "/v1/images/generations", timeout=60,
                           json={"prompt": "a fox", "size": "256x256", "model": "local", "sla_ms": 60000})
        assert quick.status_code == 200, quick.text
        assert quick.headers["x-gateway-backend"] == "local"

        # A long job (~10 s on this CPU: 768x768, 100 steps); the worker that takes its batch is killed while
        # it runs, with the first heartbeat that shows it busy.
        receiver = Receiver()
        body = {"prompt": "a slow fox", "size": "768x768", "model": "local", "steps": 100, "sla_ms": 300000,
                "seed": 3, "webhook_url": receiver.url}
        key = {"idempotency-key": "batch-job-1"}
        deadline = time.monotonic() + 10
        while _busy_worker(settings.redis_namespace) and time.monotonic() < deadline:
            time.sleep(0.05)  # the quick request's worker still reports busy for up to a heartbeat: not the victim
        job = httpx.post(server.base_url + "/v1/images/jobs", json=body, headers=key, timeout=10).json()
        victim = None
        deadline = time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            victim = _busy_worker(settings.redis_namespace)
            time.sleep(0.01)
        assert victim is not None, "no heartbeat showed the batch running"
        workers[victim.rsplit("-", 1)[0]].send_signal(signal.SIGKILL)
        again = httpx.post(server.base_url + "/v1/images/jobs", json=body, headers=key, timeout=10)
        assert again.json()["id"] == job["id"]  # an idempotent retry: the same job, not a second one
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            done = _wait_job(c, job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["backend"] == "local", done  # the client never saw it die
        survivor = ({"wa", "wb"} - {victim.rsplit("-", 1)[0]}).pop()
        assert "took over batch" in (tmp_path / f"{survivor}.log").read_text()
        deadline = time.monotonic() + 10
        while not receiver.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        secret = httpx.get(server.base_url + "/admin/webhook-secret", params={"tenant": "anonymous"},
                           headers={"authorization": "Bearer fleet-admin"}).json()["secret"]
        (headers, payload), = receiver.calls
        verify(secret, headers, payload)
        assert json.loads(payload)["data"]["id"] == job["id"]
        receiver.close()
        record = open_reader(settings).get(done["decision_id"])  # in Postgres, with the sync requests' records
        assert record["backend"] == "local" and record["replica"]
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait(10)


class _StubWorker:
    """Stands in for an engine: what is under test is the stream, not diffusion."""

    def __init__(self, seconds=0.0):
        self.name, self.state, self.detail, self.busy = "stub", "ready", "ready", False
        self.warmed, self.pending_warm, self.warm_timings = [], [], {}
        self.seconds = seconds

    async def start(self):
        pass

    async def run(self, req):
        import asyncio

        from backends.local.workers import BatchOutput

        await asyncio.sleep(self.seconds)
        return BatchOutput([b"img-%d" % s for s in req.seeds], self.seconds)


async def test_a_batch_lost_with_two_workers_fails_instead_of_running_a_third_time():
    import asyncio

    import redis.asyncio as aioredis

    from backends.local.stream import FleetKeys, RemoteFleet

    keys = FleetKeys(f"lost{uuid.uuid4().hex[:8]}")
    client = aioredis.Redis(socket_timeout=10)

    class Pool:
        def add_worker(self, worker):
            pass

        def refresh_fleet(self):
            pass

    fleet = RemoteFleet(client, keys, Pool(), max_batch_s=30)
    await fleet.start()
    try:
        async with asyncio.timeout(60):  # fails, never hangs
            await _lose_a_batch_twice(client, keys, fleet)
    finally:
        await asyncio.wait_for(fleet.close(), 10)
        for key in [k async for k in client.scan_iter(match=f"imagegw:{keys.namespace}:*")]:
            await client.delete(key)
        await client.aclose()


async def _lose_a_batch_twice(client, keys, fleet) -> None:
    import asyncio

    from backends.local.stream import StreamConsumer
    from backends.local.workers import BatchRequest

    submitted = asyncio.create_task(fleet.submit(BatchRequest(["p"], [1], 64, 64, 2)))
    await asyncio.sleep(0.1)
    # Two workers take it in turn and die (never renew, never answer).
    await client.xreadgroup(keys.group, "d1", {keys.batches: ">"}, count=1)
    await asyncio.sleep(0.3)
    await client.xautoclaim(keys.batches, keys.group, "d2", min_idle_time=0, count=1)
    await asyncio.sleep(0.3)
    third = StreamConsumer(client, keys, _StubWorker(), worker_id="w3", reclaim_s=0.2)
    running = asyncio.create_task(third.run())
    with pytest.raises(RuntimeError, match="lost with 2 workers; not run again"):
        await asyncio.wait_for(submitted, 10)
    third.stop()
    await asyncio.wait_for(running, 5)
    assert third.batches_run == 0
