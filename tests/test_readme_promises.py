"""What the README promises, each held over HTTP against a real running gateway (no sleeping to synchronise:
each test waits for the condition it needs)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from backends.errors import BackendTransientError
from gateway.auth import hash_key
from gateway.settings import ApiKeySettings
from policies.schema import Policy
from policies.types import Health
from tests.fakes import ScriptedBackend

ADMIN = "promises-admin"
FAST = {"p50_ms": 10, "p95_ms": 50}


def policy(**extra) -> Policy:
    return Policy.model_validate({
        "defaults": {"tier": "standard", "sla_ms": 10_000}, "tiers": {"standard": {"min_quality": 0.5}},
        "backends": {"cheap": {"quality": 0.8, "price_per_image_usd": 0.01, "latency_prior": FAST},
                     "dear": {"quality": 0.8, "price_per_image_usd": 0.02, "latency_prior": FAST}},
        "dispatch": {"max_attempts_per_backend": 1, "hedge_at_p99": False, "attempt_budget": False}, **extra})


@pytest.fixture
def start(settings, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    settings.local.enabled = False

    def _start(p: Policy, cheap: ScriptedBackend | None = None, dear: ScriptedBackend | None = None):
        return serve(settings, p, {"cheap": cheap or ScriptedBackend("cheap"), "dear": dear or ScriptedBackend("dear")})

    return _start


def post(server, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base_url + "/v1/images/generations", headers=headers, timeout=30,
                      json={"prompt": "p", "size": "1024x1024", **body})


def admin(server, path, **params):
    return httpx.get(server.base_url + path, params=params, headers={"authorization": f"Bearer {ADMIN}"})


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def audited(server, n: int, **params) -> list[dict]:
    return wait_for(lambda: (rows := admin(server, "/admin/audit", **params).json()["data"]) and len(rows) >= n
                    and rows)


def test_the_sla_passing_during_attempts_is_a_504_listing_them(start):
    server = start(policy(), ScriptedBackend("cheap", delay_s=5), ScriptedBackend("dear", delay_s=5))
    r = post(server, sla_ms=600)
    assert r.status_code == 504
    err = r.json()["error"]
    assert err["code"] == "deadline_exceeded" and err["type"] == "timeout"
    assert err["attempts"][0]["backend"] == "cheap" and {a["outcome"] for a in err["attempts"]} == {"timeout"}


def test_readyz_is_503_while_nothing_can_serve(settings):
    from litestar.testing import TestClient

    from gateway.app import create_app

    settings.local.enabled = False
    backends = {n: ScriptedBackend(n, health=Health.UNCONFIGURED) for n in ("cheap", "dear")}
    with TestClient(create_app(settings, policy(), backends)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not_ready" and r.json()["serving"] == []


def test_url_answers_expire_after_the_ttl(start, settings):
    settings.images.url_ttl_s = 1
    server = start(policy())
    url = post(server, response_format="url").json()["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    wait_for(lambda: httpx.get(url).status_code == 404, timeout=5)


def test_a_rules_hedge_races_the_next_candidate_and_audits_both(start):
    p = policy(rules=[{"name": "hedged", "match": {}, "hedge": True}])
    server = start(p, ScriptedBackend("cheap", delay_s=3), ScriptedBackend("dear", delay_s=0.01))
    r = post(server)
    assert r.status_code == 200 and r.headers["x-gateway-backend"] == "dear"
    record = audited(server, 1)[0]
    assert {(a["backend"], a["outcome"], a["hedge"]) for a in record["attempts"]} == {
        ("cheap", "cancelled", False), ("dear", "ok", True)}
    assert record["hedge_cost_usd"] == pytest.approx(0.01)  # the cancelled call's price, charged


def test_a_request_in_flight_finishes_under_the_policy_version_it_started_with(start):
    cheap = ScriptedBackend("cheap", delay_s=1.0)
    server = start(policy(), cheap)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(post(server)))
    slow.start()
    wait_for(lambda: cheap.calls)  # in flight
    changed = policy(objective="max_quality").model_dump(mode="json")
    put = httpx.put(server.base_url + "/admin/policy", json=changed, headers={"authorization": f"Bearer {ADMIN}"})
    assert put.status_code == 200 and put.json()["version"] == 2
    slow.join()
    assert answers[0].status_code == 200 and answers[0].headers["x-gateway-policy-version"] == "1"
    assert post(server).headers["x-gateway-policy-version"] == "2"


def test_a_monthly_budget_is_enforced(start):
    server = start(policy(budgets={"default": {"monthly_usd": 0.015}}))
    assert post(server).status_code == 200
    r = post(server)
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded" and "month" in r.json()[
        "error"]["message"]


def test_audit_filters_select_by_time_tenant_outcome_sla_and_version(start, settings):
    keys = {"acme": "key-acme-123456", "beta": "key-beta-123456"}
    settings.auth.keys = [ApiKeySettings(key_sha256=hash_key(k), tenant=t) for t, k in keys.items()]
    server = start(policy(), dear=ScriptedBackend("dear", fail=lambda j: BackendTransientError("500")))
    assert post(server, key=keys["acme"]).status_code == 200
    audited(server, 1)
    middle = time.time()
    assert post(server, key=keys["beta"], model="dear").status_code == 502
    assert post(server, key=keys["beta"], sla_ms=1).status_code == 503  # nothing fits 1 ms
    rows = audited(server, 3)
    assert {r["tenant"] for r in admin(server, "/admin/audit", tenant="acme").json()["data"]} == {"acme"}
    assert len(admin(server, "/admin/audit", tenant="beta").json()["data"]) == 2
    assert len(admin(server, "/admin/audit", since=middle).json()["data"]) == 2
    assert len(admin(server, "/admin/audit", until=middle).json()["data"]) == 1
    assert [r["status"] for r in admin(server, "/admin/audit", outcome="ok").json()["data"]] == [200]
    assert {r["status"] for r in admin(server, "/admin/audit", sla_missed="true").json()["data"]} == {502, 503}
    assert [r["status"] for r in admin(server, "/admin/audit", sla_missed="false").json()["data"]] == [200]
    assert len(admin(server, "/admin/audit", policy_version=1).json()["data"]) == len(rows)
    assert admin(server, "/admin/audit", policy_version=7).json()["data"] == []
    stats = admin(server, "/admin/stats", window_s=3600).json()
    assert stats["window_s"] == 3600 and {b["backend"] for b in stats["backends"]} >= {"cheap"}
    assert admin(server, "/admin/stats", window_s=0).status_code == 400


def test_metrics_count_sla_misses_and_fallbacks(start):
    server = start(policy(), ScriptedBackend("cheap", fail=lambda j: BackendTransientError("500")),
                   ScriptedBackend("dear", fail=lambda j: BackendTransientError("500") if j.prompt == "x" else None))
    assert post(server).status_code == 200  # cheap failed, dear served: a fallback
    assert post(server, prompt="x").status_code == 502  # both failed: its SLA missed
    text = wait_for(lambda: (t := httpx.get(server.base_url + "/metrics").text) and "imagegw_fallbacks_total 1.0" in t
                    and 'imagegw_sla_missed_total{tier="standard"} 1.0' in t and t)
    assert 'imagegw_backend_attempts_total{backend="cheap",error_class="BackendTransientError",outcome="error"} 2.0' \
        in text


def test_metrics_show_ejection_state_share_and_pacing_by_value(settings, serve, monkeypatch):
    from gateway.ejection import EjectionConfig
    from gateway.guard import BackendGuard
    from gateway.registry import Backends

    settings.local.enabled = False
    backends = {"cheap": ScriptedBackend("cheap", fail=lambda j: BackendTransientError("500")),
                "dear": ScriptedBackend("dear")}
    guards = {n: BackendGuard(n, ejection=EjectionConfig(consecutive_failures=1, base_ejection_s=60)) for n in backends}
    server = serve(settings, policy(), Backends(backends, guards))
    assert post(server).headers["x-gateway-backend"] == "dear"  # cheap failed once: ejected
    text = httpx.get(server.base_url + "/metrics").text
    assert 'imagegw_ejection_state{backend="cheap"} 2.0' in text
    assert 'imagegw_ejection_state{backend="dear"} 0.0' in text
    assert 'imagegw_backend_share{backend="cheap"} 0.0' in text and 'imagegw_backend_share{backend="dear"} 1.0' in text
    assert 'imagegw_backend_pacing_wait_seconds{backend="dear"} 0.0' in text


def test_metrics_show_the_pools_batch_occupancy(settings, shipped_policy, serve):
    import asyncio

    from gateway.settings import WarmShapeSettings

    settings.local.max_wait_ms = 80
    settings.local.warm_shapes = [WarmShapeSettings(width=64, height=64, steps=2, batch_sizes=[1])]
    server = serve(settings, shipped_policy)

    async def burst():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            await asyncio.gather(*(client.post("/v1/images/generations", json={
                "prompt": f"p{i}", "size": "64x64", "steps": 2, "model": "local"}) for i in range(6)))

    asyncio.run(burst())
    line = next(x for x in httpx.get(server.base_url + "/metrics").text.splitlines()
                if x.startswith("imagegw_local_batch_occupancy "))
    assert float(line.split()[1]) > 1.0  # six at once rode in shared batches
