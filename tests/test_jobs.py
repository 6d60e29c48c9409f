"""Async jobs: accepted at once, run by any replica, never lost, signed webhooks, idempotent retries."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time

import httpx
import pytest

from backends.errors import BackendTransientError
from gateway.audit import open_reader
from gateway.jobs.store import JobStore, _Sqlite
from gateway.jobs.webhooks import UrlPolicy, sign, verify
from policies.types import BackendKind
from tests.conftest import free_port
from tests.fakes import ScriptedBackend

BODY = {"prompt": "a fox", "size": "256x256"}


class Receiver:
    """A webhook receiver on loopback that answers with the statuses it is given, then 200."""

    def __init__(self, statuses=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.calls: list[tuple[dict, bytes]] = []
        self.statuses = list(statuses)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def job_settings(settings):
    settings.jobs.webhook_allow_http = True
    settings.jobs.webhook_allow_private = True  # the receiver is on loopback
    settings.jobs.poll_interval_s = 0.05
    return settings


def _local(delay_s=0.0, fail=None):
    return ScriptedBackend("local", kind=BackendKind.LOCAL, delay_s=delay_s, models=("tiny",), fail=fail)


def _wait(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/images/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_a_job_is_accepted_at_once_runs_and_its_signed_webhook_verifies(job_settings, shipped_policy, serve,
                                                                        monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "adm")
    receiver = Receiver(statuses=[500])  # the first delivery fails: retried with backoff
    server = serve(job_settings, shipped_policy, {"local": _local(delay_s=0.2)})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        r = c.post("/v1/images/jobs", json=BODY | {"webhook_url": receiver.url})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and r.headers["location"] == f"/v1/images/jobs/{job['id']}"
        done = _wait(c, job["id"])
        assert done["status"] == "succeeded" and done["backend"] == "local" and len(done["data"]) == 1
        assert done["data"][0]["b64_json"] and done["cost_usd"] is not None
        secret = c.get("/admin/webhook-secret", params={"tenant": "anonymous"},
                       headers={"authorization": "Bearer adm"}).json()["secret"]
        deadline = time.monotonic() + 15
        while len(receiver.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    receiver.close()
    assert len(receiver.calls) == 2  # one failed, one acknowledged; never again after that
    (first_headers, _), (headers, body) = receiver.calls
    assert headers["webhook-id"] == first_headers["webhook-id"] == job["id"]  # receivers de-duplicate by it
    verify(secret, headers, body)
    with pytest.raises(ValueError):
        verify(secret, headers, body + b" ")
    event = json.loads(body)
    assert event["type"] == "image.job.succeeded" and event["data"]["id"] == job["id"]
    server.stop()
    record = open_reader(job_settings).get(done["decision_id"])
    assert record["status"] == 200 and record["backend"] == "local"  # audited like a synchronous request


def test_a_bad_job_body_is_a_400_naming_the_field_and_a_disallowed_webhook_is_refused(settings, shipped_policy,
                                                                                      serve):
    server = serve(settings, shipped_policy, {"local": _local()})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        r = c.post("/v1/images/jobs", json={"prompt": "x", "n": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/images/jobs", json=BODY | {"prompt": "x" * 40_000})  # a limit, checked when accepted
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = c.post("/v1/images/jobs", json=BODY | {"tier": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tier"
        r = c.post("/v1/images/jobs", json=BODY | {"webhook_url": "http://127.0.0.1:9/hook"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url"
        assert "https" in r.json()["error"]["message"]
        r = c.post("/v1/images/jobs", content=b"[1]", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert c.get("/v1/images/jobs/nope").status_code == 404


def test_the_url_policy_refuses_private_and_loopback_hosts_and_other_schemes():
    policy = UrlPolicy()
    assert "https" in policy.check("http://example.com/x")
    assert "private" in policy.check("https://127.0.0.1/x")
    assert "private" in policy.check("https://10.1.2.3/x")
    assert "private" in policy.check("https://[::1]/x")
    assert "user:password" in policy.check("https://u:p@example.com/x")
    assert "not in" in UrlPolicy(hosts=("hooks.example.com",)).check("https://evil.com/x")
    assert UrlPolicy(allow_private=True).check("https://127.0.0.1/x") is None


def test_signatures_follow_standard_webhooks():
    # The Standard Webhooks reference vector (standard-webhooks spec, "Signature scheme" example).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_an_idempotent_retry_gets_the_first_answer_and_is_charged_once(settings, shipped_policy, serve):
    local = _local()
    server = serve(settings, shipped_policy, {"local": local})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        key = {"idempotency-key": "order-42"}
        first = c.post("/v1/images/generations", json=BODY | {"seed": 1}, headers=key)
        again = c.post("/v1/images/generations", json=BODY | {"seed": 1}, headers=key)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-gateway-decision-id"] == first.headers["x-gateway-decision-id"]
        other = c.post("/v1/images/generations", json=BODY | {"seed": 2}, headers=key)
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        bad = c.post("/v1/images/generations", json=BODY, headers={"idempotency-key": "has space"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Idempotency-Key"
        j1 = c.post("/v1/images/jobs", json=BODY, headers={"idempotency-key": "job-7"}).json()
        j2 = c.post("/v1/images/jobs", json=BODY, headers={"idempotency-key": "job-7"})
        assert j2.status_code == 202 and j2.json()["id"] == j1["id"] and j2.headers["idempotent-replayed"] == "true"
        _wait(c, j1["id"])
        finished = c.delete(f"/v1/images/jobs/{j1['id']}")
        assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"
    assert len(local.calls) == 2  # one generation for the first request, one for the job
    server.stop()
    records = {r["id"]: r for r in open_reader(settings).recent(50)}
    replays = [r for r in records.values() if r["outcome"] == "replayed"]
    assert len(replays) == 1 and replays[0]["replay_of"] == first.headers["x-gateway-decision-id"]
    assert replays[0]["cost_usd"] == 0 and replays[0]["id"] != replays[0]["replay_of"]  # audited, not charged


def test_a_failed_request_forgets_its_key_so_a_retry_runs_again(settings, shipped_policy, serve):
    failing = {"on": True}
    local = _local(fail=lambda job: BackendTransientError("boom") if failing["on"] else None)
    server = serve(settings, shipped_policy, {"local": local})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        key = {"idempotency-key": "retry-me"}
        assert c.post("/v1/images/generations", json=BODY, headers=key).status_code == 502
        failing["on"] = False
        r = c.post("/v1/images/generations", json=BODY, headers=key)
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers


def test_cancel_stops_a_running_job_and_its_outcome_never_overwrites_the_cancel(job_settings, shipped_policy, serve):
    job_settings.jobs.lease_s = 1.5  # renewals (each a cancel check) every half second
    server = serve(job_settings, shipped_policy, {"local": _local(delay_s=30)})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        job = c.post("/v1/images/jobs", json=BODY).json()
        _wait(c, job["id"], statuses=("running",))
        r = c.delete(f"/v1/images/jobs/{job['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        time.sleep(1.0)
        assert c.get(f"/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"  # not overwritten
        assert c.delete(f"/v1/images/jobs/{job['id']}").json()["status"] == "cancelled"  # DELETE is idempotent


def test_jobs_belong_to_their_tenant(settings, shipped_policy, serve):
    from gateway.auth import hash_key
    from gateway.settings import ApiKeySettings

    settings.auth.keys = [ApiKeySettings(key_sha256=hash_key("key-a"), tenant="a"),
                          ApiKeySettings(key_sha256=hash_key("key-b"), tenant="b")]
    server = serve(settings, shipped_policy, {"local": _local()})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        job = c.post("/v1/images/jobs", json=BODY, headers={"authorization": "Bearer key-a"}).json()
        assert c.get(f"/v1/images/jobs/{job['id']}", headers={"authorization": "Bearer key-b"}).status_code == 404
        assert c.delete(f"/v1/images/jobs/{job['id']}", headers={"authorization": "Bearer key-b"}).status_code == 404
        assert c.get(f"/v1/images/jobs/{job['id']}", headers={"authorization": "Bearer key-a"}).status_code == 200


def test_a_restart_loses_no_queued_or_running_job(job_settings, shipped_policy, serve):
    job_settings.jobs.concurrency = 1
    server = serve(job_settings, shipped_policy, {"local": _local(delay_s=30)})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        ids = [c.post("/v1/images/jobs", json=BODY | {"seed": i}).json()["id"] for i in range(3)]
        _wait(c, ids[0], statuses=("running",))
    server.stop()  # one running (put back in the queue), two queued
    server = serve(job_settings, shipped_policy, {"local": _local()})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        assert [_wait(c, i)["status"] for i in ids] == ["succeeded"] * 3


async def test_a_job_whose_replica_died_is_claimed_again_after_its_lease_and_run_once_more_at_most(tmp_path):
    store = JobStore(_Sqlite(tmp_path / "jobs.sqlite3"), lease_s=5)
    await store.add("j1", "t", b"{}", None, None, None, now=0.0)
    assert (await store.claim("dead-replica", now=1.0)).runs == 1
    assert await store.claim("other", now=2.0) is None  # the lease still holds
    again = await store.claim("other", now=7.0)  # dead-replica never renewed
    assert again.id == "j1" and again.runs == 2
    assert not await store.finish("j1", "dead-replica", "succeeded", 8.0)  # the lost runner cannot overwrite
    assert await store.finish("j1", "other", "succeeded", 8.0, result=[])
    assert (await store.get("j1"))["status"] == "succeeded"
    store.close()


async def test_two_replicas_claiming_at_once_on_postgres_take_different_jobs(postgres_dsn):
    from gateway.jobs.store import _Postgres

    stores = [JobStore(_Postgres(postgres_dsn), lease_s=30) for _ in range(2)]
    for i in range(20):
        await stores[0].add(f"j{i:02d}", "t", b"{}", None, None, None, now=float(i))
    claims = await asyncio.gather(*(stores[i % 2].claim(f"r{i % 2}", now=100.0) for i in range(24)))
    got = [c.id for c in claims if c is not None]
    assert sorted(got) == [f"j{i:02d}" for i in range(20)]  # each job once, none twice
    for s in stores:
        s.close()


def test_a_job_with_hours_of_slack_waits_while_the_pool_is_busy_and_runs_once_it_is_idle(job_settings,
                                                                                         shipped_policy, serve):
    import dataclasses

    from backends.protocol import LoadReport
    from policies.schema import JobsPolicy
    from policies.types import Health

    class BusyPool(ScriptedBackend):
        busy = True

        def load(self):
            report = super().load()
            return LoadReport(Health.OK, pool=dataclasses.replace(report.pool, has_headroom=not self.busy))

    pool = BusyPool("local", kind=BackendKind.LOCAL, models=("tiny",))
    policy = shipped_policy.model_copy(update={"jobs": JobsPolicy(recheck_s=0.3)})
    server = serve(job_settings, policy, {"local": pool, "reve": ScriptedBackend("reve", models=("reve-create",))})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        job = c.post("/v1/images/jobs", json=BODY | {"sla_ms": 7_200_000, "model": "local"}).json()
        time.sleep(1.0)
        waiting = c.get(f"/v1/images/jobs/{job['id']}").json()
        assert waiting["status"] == "queued" and waiting["held_until"] and not pool.calls  # held, not run
        pool.busy = False
        done = _wait(c, job["id"])
        assert done["status"] == "succeeded" and done["backend"] == "local" and "held_until" not in done
        pool.busy = True
        elsewhere = c.post("/v1/images/jobs", json=BODY | {"sla_ms": 7_200_000, "model": "reve"}).json()
        assert _wait(c, elsewhere["id"], timeout=5)["backend"] == "reve"  # the pool cannot take it: no wait
        urgent = c.post("/v1/images/jobs", json=BODY | {"sla_ms": 60_000, "model": "local"}).json()
        assert _wait(c, urgent["id"], timeout=5)["status"] == "succeeded"  # 60 s < the 120 s margin: runs at once


def test_a_draft_no_backend_can_serve_in_time_is_served_at_risk_instead_of_refused(settings, shipped_policy, serve):
    server = serve(settings, shipped_policy, {"reve": ScriptedBackend("reve", models=("reve-create",))})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        r = c.post("/v1/images/generations", json=BODY | {"tier": "draft", "sla_ms": 1000})  # reve's p95: 15 s
        assert r.status_code == 200 and r.headers["x-gateway-sla"] == "at_risk"
        refused = c.post("/v1/images/generations", json=BODY | {"tier": "standard", "sla_ms": 1000})
        assert refused.status_code == 503 and "x-gateway-sla" not in refused.headers
    server.stop()
    record = open_reader(settings).get(r.headers["x-gateway-decision-id"])
    assert record["decision"]["at_risk"] and "best effort" in record["decision"]["reason"]
