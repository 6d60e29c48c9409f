"""Live state across replicas through a real Redis: budgets, policy changes, breakers, and Redis going away."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from backends.errors import BackendTransientError
from gateway.state import MemoryStore
from gateway.state_redis import RedisStore
from policies.schema import Policy
from policies.types import BackendKind
from tests.fakes import ScriptedBackend

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def namespace():
    return f"test-{uuid.uuid4().hex[:10]}"


async def _redis_store(namespace):
    return RedisStore(aioredis.Redis.from_url(REDIS_URL), namespace, replica_id="t")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_reservations_are_atomic_under_concurrency(kind, namespace):
    store = MemoryStore() if kind == "memory" else await _redis_store(namespace)
    now = time.time()
    results = await asyncio.gather(*(store.reserve("acme", 0.1, 1.0, None, now) for _ in range(50)))
    granted = [r for r, _, _ in results if r is not None]
    assert len(granted) == 10  # $1.00 a day at $0.10 each, whatever the interleaving
    await store.settle(granted[0], 0.0)  # that request failed: its reservation is returned
    spend = await store.spend(now)
    assert spend["acme"]["day"] == pytest.approx(0.9) and spend["acme"]["month"] == pytest.approx(0.9)
    await store.close()


async def test_redis_store_shares_outcomes_and_ejections(namespace):
    a, b = await _redis_store(namespace), await _redis_store(namespace)
    a.replica_id, b.replica_id = "a", "b"
    await a.add_outcomes([("reve", 812.0, True, time.time()), ("bria", 900.0, False, time.time()),
                          ("reve", 700.0, True, time.time())])
    shared = await b.outcomes(["reve", "bria"])
    assert [s[1] for s in shared["reve"]] == [812.0, 700.0] and shared["bria"][0][2] is False
    await a.eject("reve", 5.0, "5 consecutive failures")
    seconds, reason = (await b.ejections(["reve", "bria"]))["reve"]
    assert 4 < seconds <= 5 and reason == "5 consecutive failures"
    assert await a.ejections(["reve"]) == {}  # its own ejection is not echoed back as "shared"
    await a.close()
    await b.close()


FAST = {"p50_ms": 100, "p95_ms": 500}


def _policy(objective="min_cost", **budgets) -> Policy:
    return Policy.model_validate({
        "objective": objective,
        "defaults": {"tier": "standard", "sla_ms": 20_000},
        "tiers": {"standard": {"min_quality": 0.5}, "cheap": {"min_quality": 0.0}},
        "backends": {"local": {"quality": 0.6, "latency_prior": {"p50_ms": 1000, "p95_ms": 2000}},
                     "reve": {"quality": 0.8, "price_per_image_usd": 0.024, "latency_prior": FAST},
                     "gemini": {"quality": 0.9, "price_per_image_usd": 0.134, "latency_prior": FAST}},
        "rules": [] if objective == "min_latency" else [
            {"name": "apis-only", "match": {"tiers": ["standard"]}, "deny": ["local"]}],
        "budgets": budgets,
    })


def _backends(fail_reve=False):
    return {"local": ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",)),
            "reve": ScriptedBackend("reve", models=("reve-create",),
                                    fail=(lambda j: BackendTransientError("500")) if fail_reve else None),
            "gemini": ScriptedBackend("gemini", models=("g",))}


def _post(server, **body):
    return httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "x", "size": "256x256", **body})


def test_a_budget_is_enforced_across_replicas(settings, serve, namespace, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "adm")
    settings.redis_url, settings.redis_namespace = REDIS_URL, namespace
    policy = _policy(default={"daily_usd": 0.1}, on_limit="reject")
    a, b = serve(settings, policy, _backends()), serve(settings, policy, _backends())
    served = [_post(server) for server in (a, b, a, b, a, b)]
    codes = [r.status_code for r in served]
    assert codes.count(200) == 4 and codes.count(429) == 2  # 4 x $0.024 fits in $0.10; the 5th does not
    err = served[codes.index(429)].json()["error"]
    assert err["code"] == "budget_exceeded" and "over its budget" in err["message"]
    assert httpx.get(a.base_url + "/admin/spend", headers={"authorization": "Bearer k"}).status_code == 401
    spend = httpx.get(b.base_url + "/admin/spend", headers={"authorization": "Bearer adm"}).json()
    row = next(r for r in spend["data"] if r["tenant"] == "anonymous")
    assert row["day_usd"] == pytest.approx(4 * 0.024) and row["daily_limit_usd"] == 0.1 and spend["shared"]


def test_at_the_limit_local_only_and_downgrade_tier_keep_serving(settings, serve):
    # min_latency: the faster API first, until the budget runs out
    local_only = serve(settings, _policy("min_latency", default={"daily_usd": 0.03}, on_limit="local_only"),
                       _backends())
    assert _post(local_only).headers["x-gateway-backend"] == "reve"
    over = _post(local_only)
    assert over.status_code == 200 and over.headers["x-gateway-backend"] == "local"
    downgrade = serve(settings, _policy(default={"daily_usd": 0.03}, on_limit="downgrade_tier",
                                        downgrade_to="cheap"), _backends())
    assert _post(downgrade).headers["x-gateway-backend"] == "reve"
    assert _post(downgrade).headers["x-gateway-backend"] == "local"  # cheap tier allows the pool


def test_a_policy_change_on_one_replica_reaches_the_others(settings, serve, namespace, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "adm")
    settings.redis_url, settings.redis_namespace = REDIS_URL, namespace
    a, b = serve(settings, _policy(), _backends()), serve(settings, _policy(), _backends())
    changed = {**_policy().model_dump(mode="json"), "objective": "max_quality"}
    put = httpx.put(a.base_url + "/admin/policy", content=yaml.safe_dump(changed),
                    headers={"authorization": "Bearer adm"})
    assert put.status_code == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _post(b).headers["x-gateway-policy-fingerprint"] != put.json()["fingerprint"]:
        time.sleep(0.05)
    assert _post(b).headers["x-gateway-backend"] == "gemini"  # max_quality, applied on B too
    c = serve(settings, _policy(), _backends())  # a replica that starts later adopts the current policy
    assert _post(c).headers["x-gateway-policy-fingerprint"] == put.json()["fingerprint"]
    assert _post(c).headers["x-gateway-policy-version"] == "2"
    history = httpx.get(c.base_url + "/admin/policy/history", headers={"authorization": "Bearer adm"}).json()
    assert [v["version"] for v in history["versions"]] == [2, 1]  # and the shared history, same numbers
    assert history["versions"][0]["fingerprint"] == put.json()["fingerprint"]


def test_an_ejection_on_one_replica_is_respected_by_the_others(settings, serve, namespace):
    settings.redis_url, settings.redis_namespace = REDIS_URL, namespace
    settings.state_sync_interval_s = 0.1
    from gateway.ejection import EjectionConfig
    from gateway.guard import BackendGuard
    from gateway.registry import Backends

    def built(fail):
        backends = _backends(fail_reve=fail)
        guards = {n: BackendGuard(n, ejection=EjectionConfig(consecutive_failures=2, base_ejection_s=30))
                  for n in backends}
        return Backends(backends, guards)

    a, b = serve(settings, _policy(), built(True)), serve(settings, _policy(), built(False))
    assert _post(a).headers["x-gateway-backend"] == "gemini"  # reve failed twice (retry): ejected
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _post(b).headers["x-gateway-backend"] == "reve":
        time.sleep(0.1)
    reve = next(x for x in httpx.get(b.base_url + "/v1/backends").json()["data"] if x["name"] == "reve")
    assert reve["ejection"]["state"] == "ejected" and "shared" in reve["detail"]


def test_without_redis_a_replica_keeps_serving_and_says_it_is_degraded(settings, serve):
    settings.redis_url = "redis://127.0.0.1:1/0"  # nothing listens there
    policy = _policy(default={"daily_usd": 1.0})
    server = serve(settings, policy, _backends())
    assert _post(server).status_code == 200
    ready = httpx.get(server.base_url + "/readyz").json()
    assert ready["status"] == "degraded" and "unreachable" in ready["shared_state"]
    assert "imagegw_state_degraded 1.0" in httpx.get(server.base_url + "/metrics").text


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_requests_per_minute_is_one_window_for_all_replicas(kind, namespace):
    a = MemoryStore() if kind == "memory" else await _redis_store(namespace)
    b = a if kind == "memory" else await _redis_store(namespace)
    waits = await asyncio.gather(*(store.take_token("bria", 10) for store in [a, b] * 10))
    assert sum(1 for w in waits if w == 0) == 10  # 10 per minute between them, not 10 each
    assert all(0 < w <= 60 for w in waits if w != 0)  # the others are told how long until a turn frees
    await a.close()
    if b is not a:
        await b.close()


def test_budget_use_is_a_metric(settings, serve):
    server = serve(settings, _policy(default={"daily_usd": 1.0}), _backends())
    _post(server)
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and "imagegw_budget_used_ratio{" not in text:
        time.sleep(0.1)
        text = httpx.get(server.base_url + "/metrics").text
    assert 'imagegw_budget_spend_usd{period="day",tenant="anonymous"} 0.024' in text
    assert 'imagegw_budget_used_ratio{period="day",tenant="anonymous"} 0.024' in text


async def test_a_shutdown_ends_the_sync_loop_even_when_a_store_call_swallowed_its_cancellation():
    """A cancellation absorbed below the loop (a Redis call that ends in an error the store answers from its local
    view) leaves the loop running: shutdown must still end it, or it waits forever."""
    from gateway.state_sync import StateSync
    from gateway.stats import OutcomeStats

    class SwallowsOneCancellation(MemoryStore):
        swallowed = 0

        async def tick(self, now):
            if not self.swallowed:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.swallowed += 1  # and carry on, as the store's outage fallback does

    store = SwallowsOneCancellation()
    sync = StateSync(store, OutcomeStats(), {}, interval_s=0.01)
    await sync.start()
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(sync.close())
    done, _ = await asyncio.wait({closing}, timeout=3)  # waits without cancelling: a cancel would end the loop
    if not done:
        closing.cancel()
    assert closing in done and store.swallowed == 1 and sync._task.done()


async def test_stopping_a_task_that_ignores_every_cancellation_gives_up_after_its_bound(caplog):
    from gateway.tasks import stop

    release = asyncio.Event()

    async def stubborn():
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # every cancellation absorbed
                await asyncio.sleep(1)

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    assert await stop(task, within_s=0.2) is False
    assert "stubborn did not stop within 0.2 s" in caplog.text
    release.set()
    assert await stop(task, within_s=2) is True  # once it lets go, it ends


async def test_a_shutdown_waits_for_pending_ejections_only_so_long_when_the_store_hangs():
    from gateway.state_sync import StateSync
    from gateway.stats import OutcomeStats

    release = asyncio.Event()

    class HangsOnEject(MemoryStore):
        async def eject(self, backend, seconds, reason):
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):  # a hung call that absorbs cancellation
                    await asyncio.sleep(0.05)

    class SlowToEject(MemoryStore):
        told: list[str] = []

        async def eject(self, backend, seconds, reason):
            await asyncio.sleep(0.1)  # a Redis round trip
            self.told.append(backend)

    landed = SlowToEject()
    sync = StateSync(landed, OutcomeStats(), {}, interval_s=0.01)
    sync.spawn(landed.eject("reve", 30, "5 failures in a row"))
    await sync.close()
    assert landed.told == ["reve"]  # a call that can land, lands before close returns

    hung = StateSync(HangsOnEject(), OutcomeStats(), {}, interval_s=0.01)
    hung.pending_within_s = 0.2
    for backend in ("reve", "bria", "seedream", "gemini"):
        hung.spawn(hung.store.eject(backend, 30, "5 failures in a row"))
    calls = set(hung._pending)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hung.close()
    # 0.2 s to land, then 1 s to stop them all at once (not 1 s each), then left behind
    assert loop.time() - started < 3 and not any(call.done() for call in calls)
    release.set()
    await asyncio.wait(calls, timeout=2)
    assert all(call.done() for call in calls)
