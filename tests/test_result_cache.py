"""Identical seeded requests are served once: a repeat from the result cache, requests in flight together from
one generation; nothing is charged for them, the cost saved is audited and counted, and a tenant never gets
another tenant's images."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from backends.protocol import GeneratedImage
from gateway.auth import hash_key
from gateway.result_cache import CachedResult, ResultCache, request_key
from gateway.schemas import parse_generation_request
from gateway.settings import ApiKeySettings
from tests.fakes import ScriptedBackend
from tests.test_admin import ADMIN, admin, wait_audited


def _req(**body):
    return parse_generation_request(__import__("json").dumps({"prompt": "a red fox", **body}).encode())


@pytest.fixture
def gateway(settings, shipped_policy, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    reve = ScriptedBackend("reve", models=("reve-create",), delay_s=0.3)
    server = serve(settings, shipped_policy, {"reve": reve})
    server.reve = reve
    return server


def post(server, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base_url + "/v1/images/generations", headers=headers, timeout=30,
                      json={"prompt": "a red fox", "size": "1024x1024", "model": "reve", **body})


def test_the_key_ignores_whitespace_and_response_format_but_not_what_shapes_the_image():
    base = request_key(_req(seed=1), 1024, 1024, "t")
    assert request_key(_req(prompt="  a   red\tfox ", seed=1, response_format="url"), 1024, 1024, "t") == base
    for other in (_req(seed=2), _req(seed=1, steps=20), _req(seed=1, output_format="jpeg"),
                  _req(seed=1, negative_prompt="blur"), _req(seed=1, tier="premium"), _req(seed=1, n=2)):
        assert request_key(other, 1024, 1024, "t") != base
    assert request_key(_req(seed=1), 1024, 768, "t") != base
    assert request_key(_req(seed=1), 1024, 1024, "u") != base  # per tenant by default
    assert request_key(_req(seed=1), 1024, 1024, "u", shared=True) == request_key(_req(seed=1), 1024, 1024, "t",
                                                                                  shared=True)


def test_a_request_without_a_seed_asks_for_a_new_image_and_is_not_cached(tmp_path):
    cache = ResultCache(tmp_path, max_bytes=10**6, ttl_s=60)
    assert cache.key(_req(), 1024, 1024, "t") is None
    assert ResultCache(tmp_path, max_bytes=10**6, ttl_s=60, unseeded=True).key(_req(), 1024, 1024, "t")


def test_a_repeat_is_served_from_the_cache_with_nothing_charged_and_the_saving_audited(gateway):
    first = post(gateway, seed=7)
    again = post(gateway, seed=7, response_format="url")
    assert first.status_code == again.status_code == 200
    assert len(gateway.reve.calls) == 1  # the repeat ran no backend
    assert first.headers.get("x-gateway-cache") is None and again.headers["x-gateway-cache"] == "hit"
    assert again.headers["x-gateway-cost-usd"] == "0.000000"
    assert again.headers["x-gateway-cache-source"] == first.headers["x-gateway-decision-id"]
    fetched = httpx.get(again.json()["data"][0]["url"])  # the cached image answered as a URL this time
    assert fetched.content == __import__("base64").b64decode(first.json()["data"][0]["b64_json"])
    wait_audited(gateway, 2)
    made = admin(gateway, "GET", f"/admin/audit/{first.headers['x-gateway-decision-id']}").json()
    record = admin(gateway, "GET", f"/admin/audit/{again.headers['x-gateway-decision-id']}").json()
    assert record["outcome"] == "cached" and record["cache"] == "hit" and record["cost_usd"] == 0
    assert record["cost_saved_usd"] == made["cost_usd"] > 0 and record["cached_from"] == made["id"]
    metrics = httpx.get(gateway.base_url + "/metrics").text
    assert 'imagegw_result_cache_served_total{kind="hit"} 1.0' in metrics
    assert f"imagegw_result_cache_saved_usd_total {made['cost_usd']}" in metrics
    stats = admin(gateway, "GET", "/admin/stats").json()
    assert stats["result_cache"]["hits"] == 1 and stats["result_cache"]["entries"] == 1
    assert next(r for r in stats["backends"] if r["backend"] == "cache")["cost_saved_usd"] == made["cost_usd"]


def test_identical_requests_in_flight_share_one_generation(gateway):
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: post(gateway, seed=11), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert len(gateway.reve.calls) == 1
    kinds = sorted(a.headers.get("x-gateway-cache", "made") for a in answers)
    assert kinds == ["made", "shared", "shared", "shared", "shared"]
    assert len({a.json()["data"][0]["b64_json"] for a in answers}) == 1


def test_when_the_first_of_identical_requests_fails_the_others_make_their_own(settings, shipped_policy, serve):
    from backends.errors import BackendTransientError

    failed = []

    def fail_first(job):
        if not failed:
            failed.append(job.id)
            return BackendTransientError("upstream 503")
        return None

    reve = ScriptedBackend("reve", models=("reve-create",), delay_s=0.3, fail=fail_first)
    server = serve(settings, shipped_policy, {"reve": reve})
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(server, seed=5), range(3)))
    assert all(a.status_code == 200 for a in answers)  # the dispatcher retried the first; nobody got its error
    assert len(reve.calls) >= 2


def test_tenants_do_not_share_entries(settings, shipped_policy, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", ADMIN)
    settings.auth.keys = [ApiKeySettings(key_sha256=hash_key("a-key"), tenant="a"),
                          ApiKeySettings(key_sha256=hash_key("b-key"), tenant="b")]
    reve = ScriptedBackend("reve", models=("reve-create",))
    server = serve(settings, shipped_policy, {"reve": reve})
    assert post(server, key="a-key", seed=3).status_code == 200
    other = post(server, key="b-key", seed=3)
    assert other.status_code == 200 and other.headers.get("x-gateway-cache") is None
    assert post(server, key="a-key", seed=3).headers["x-gateway-cache"] == "hit"
    assert len(reve.calls) == 2


def _entry(n: int, size: int) -> CachedResult:
    return CachedResult(tuple(GeneratedImage(data=bytes([i]) * size) for i in range(n)), "64x64", "reve", "m",
                        0.02, f"id{n}")


def test_entries_expire_and_the_least_recently_used_go_past_the_size_cap(tmp_path):
    now = [1000.0]
    cache = ResultCache(tmp_path, max_bytes=2500, ttl_s=100, clock=lambda: now[0])

    async def scenario():
        await cache.put("a", _entry(1, 1000))
        now[0] += 1
        await cache.put("b", _entry(1, 1000))
        now[0] += 1
        assert (await cache.get("a")).images[0].data == bytes([0]) * 1000  # a is now the most recently used
        now[0] += 1
        await cache.put("c", _entry(1, 1000))  # 3000 bytes > 2500: the least recently used (b) goes
        assert await cache.get("b") is None and await cache.get("a") is not None
        now[0] += 200
        assert await cache.get("c") is None  # past its TTL
        assert not list(tmp_path.glob("c.*"))

    asyncio.run(scenario())
    # A fresh process finds what is on disk.
    again = ResultCache(tmp_path, max_bytes=2500, ttl_s=10**6, clock=lambda: now[0])
    assert asyncio.run(again.get("a")) is not None


def test_a_damaged_entry_is_a_miss_not_an_error(tmp_path):
    cache = ResultCache(tmp_path, max_bytes=10**6, ttl_s=100)
    asyncio.run(cache.put("k", _entry(2, 10)))
    (tmp_path / "k.1").unlink()
    assert asyncio.run(cache.get("k")) is None
    started = time.monotonic()
    assert asyncio.run(ResultCache(tmp_path / "none", max_bytes=1, ttl_s=1).get("x")) is None
    assert time.monotonic() - started < 1


def test_the_cache_can_be_turned_off(settings, shipped_policy, serve):
    settings.cache.enabled = False
    reve = ScriptedBackend("reve", models=("reve-create",))
    server = serve(settings, shipped_policy, {"reve": reve})
    assert post(server, seed=1).status_code == post(server, seed=1).status_code == 200
    assert len(reve.calls) == 2


# -- a fleet sharing one cache folder --------------------------------------------------------------------------

REDIS_URL = "redis://127.0.0.1:6379/0"


def _replicas(settings, serve, policy, backends, tmp_path, *, redis_url=REDIS_URL, count=2):
    """`count` gateways with data folders of their own and one cache folder on shared storage."""
    servers = []
    for i in range(count):
        mine = settings.model_copy(deep=True)
        mine.data_dir = tmp_path / f"replica-{i}"
        mine.cache.dir, mine.cache.shared_dir = str(tmp_path / "shared-cache"), True
        if redis_url:
            mine.redis_url, mine.redis_namespace = redis_url, f"cache-{tmp_path.name}"
        servers.append(serve(mine, policy, backends))
    return servers


def _burst(servers, per_server, **body):
    targets = [s for s in servers for _ in range(per_server)]
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda s: post(s, **body), targets))


def test_identical_requests_on_different_replicas_share_one_generation(settings, shipped_policy, serve, tmp_path):
    reve = ScriptedBackend("reve", models=("reve-create",), delay_s=0.5)
    servers = _replicas(settings, serve, shipped_policy, {"reve": reve}, tmp_path)
    answers = _burst(servers, 3, seed=21)
    assert [a.status_code for a in answers] == [200] * 6
    assert len(reve.calls) == 1  # one generation for the fleet
    assert sorted(a.headers.get("x-gateway-cache", "made") for a in answers) == ["made"] + ["shared"] * 5
    assert len({a.json()["data"][0]["b64_json"] for a in answers}) == 1
    assert post(servers[1], seed=21).headers["x-gateway-cache"] == "hit"  # and a later repeat anywhere is a hit


def test_a_replica_serves_what_another_cached_in_a_shared_folder_even_without_redis(settings, shipped_policy,
                                                                                     serve, tmp_path):
    reve = ScriptedBackend("reve", models=("reve-create",))
    a, b = _replicas(settings, serve, shipped_policy, {"reve": reve}, tmp_path, redis_url=None)
    assert post(b, seed=2).status_code == 200  # b loads its index of the folder (empty) first
    made = post(a, seed=3)
    again = post(b, seed=3)
    assert again.headers["x-gateway-cache"] == "hit" and again.headers["x-gateway-cache-source"] == \
        made.headers["x-gateway-decision-id"]
    assert len(reve.calls) == 2


def test_when_the_replica_making_the_images_fails_the_others_make_their_own(settings, shipped_policy, serve,
                                                                           tmp_path):
    from backends.errors import ContentRefused

    first = []

    def refuse_first(job):
        if not first:
            first.append(job.id)
            return ContentRefused("content policy")  # not retried: its request fails
        return None

    reve = ScriptedBackend("reve", models=("reve-create",), delay_s=0.3, fail=refuse_first)
    servers = _replicas(settings, serve, shipped_policy, {"reve": reve}, tmp_path)
    answers = _burst(servers, 2, seed=9)
    # Only the maker's own request failed (a content refusal is the client's 400); the rest made their own.
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 400]
    assert 2 <= len(reve.calls) <= 3


def test_with_redis_away_each_replica_makes_its_own_and_nothing_fails(settings, shipped_policy, serve, tmp_path):
    reve = ScriptedBackend("reve", models=("reve-create",), delay_s=0.3)
    servers = _replicas(settings, serve, shipped_policy, {"reve": reve}, tmp_path,
                        redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    answers = _burst(servers, 3, seed=4)
    assert [a.status_code for a in answers] == [200] * 6
    assert len(reve.calls) <= 2  # single flight still holds within each replica


async def test_a_flight_lease_is_held_by_one_replica_and_released_only_by_it():
    import uuid

    import redis.asyncio as aioredis

    from gateway.state_redis import RedisStore

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    a, b = (RedisStore(aioredis.Redis.from_url(REDIS_URL), namespace, replica_id=r) for r in "ab")
    assert await a.claim_flight("k", 0.3) is True
    assert await b.claim_flight("k", 5) is False and await b.flight_held("k")
    await b.release_flight("k")  # not b's to release
    assert await a.flight_held("k")
    await asyncio.sleep(0.4)  # a's maker died: its lease runs out on its own
    assert not await b.flight_held("k") and await b.claim_flight("k", 5) is True
    await a.release_flight("k")
    assert await a.flight_held("k")  # a's old lease is gone; b's stands
    await b.release_flight("k")
    assert not await a.flight_held("k")
    await a.close()
    await b.close()


async def test_a_replica_that_finds_the_lease_free_serves_the_entry_landed_meanwhile_instead_of_remaking_it(
        tmp_path):
    import uuid

    import redis.asyncio as aioredis

    from gateway.state_redis import RedisStore
    from gateway.state_sync import StateSync
    from gateway.stats import OutcomeStats

    namespace = f"test-{uuid.uuid4().hex[:10]}"
    a, b = (ResultCache(tmp_path, max_bytes=10**6, ttl_s=60, shared_dir=True,
                        fleet=RedisStore(aioredis.Redis.from_url(REDIS_URL), namespace, replica_id=r)) for r in "ab")
    a.spawn = StateSync(a.fleet, OutcomeStats(), {}).spawn  # as the gateway wires it
    assert await b.get("k") is None  # b looks first: a miss
    assert await a.from_fleet("k", 5) == (None, "")  # a leads, makes the images, stores them and lets go
    await a.put("k", _entry(1, 10))
    a.land("k", None)
    await asyncio.sleep(0.05)
    found, kind = await b.from_fleet("k", 5)  # b got in just after: the lease is free, the entry is there
    assert kind == "hit" and found.made_by == "id1"
    assert not await b.fleet.flight_held("k")
    await a.fleet.close()
    await b.fleet.close()


def test_replicas_sharing_a_folder_keep_it_under_the_size_cap_together(tmp_path):
    now = [1000.0]
    a, b = (ResultCache(tmp_path, max_bytes=2500, ttl_s=10**6, shared_dir=True, clock=lambda: now[0])
            for _ in range(2))
    a.RESCAN_S = b.RESCAN_S = 0.0  # every write looks at the folder afresh (60 s by default)

    async def scenario():
        assert await b.get("x") is None  # b has looked at the (empty) folder
        for key in ("a1", "a2"):
            await a.put(key, _entry(1, 1000))
            now[0] += 1
        await b.put("b1", _entry(1, 1000))  # 3000 bytes in the folder: the least recently used (a1) goes
        assert sorted(p.name for p in tmp_path.glob("*.json")) == ["a2.json", "b1.json"]
        assert (await a.get("b1")) is not None  # and a serves what b made

    asyncio.run(scenario())


def test_many_writes_and_reads_at_once_keep_the_cache_whole_and_never_raise(tmp_path, monkeypatch):
    # Under load a batch's jobs land together, each storing from its own thread while others read and evict:
    # an unguarded index once failed a request whose images were made ("dictionary changed size during
    # iteration"). A cache failure, were there one, must cost the cache and never the request.
    cache = ResultCache(tmp_path, max_bytes=150_000 + 20 * 64, ttl_s=100)
    cache._load_index().update({f"old{i}": (float(i), 1) for i in range(150_000)})  # a long index, the oldest
    cache._used = 150_000
    errors = []
    monkeypatch.setattr("gateway.result_cache.log.exception", lambda *a, **k: errors.append(a))

    async def requests(worker: int) -> None:  # each as the service stores and looks up, on its own loop
        for i in range(40):
            await cache.put(f"w{worker}-{i}", _entry(1, 64))
            await cache.get(f"w{(worker + 1) % 8}-{i}")

    def hammer(worker: int) -> None:
        asyncio.run(requests(worker))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(hammer, w) for w in range(8)]:
            future.result()  # raises what a thread raised
    stats = cache.stats()
    assert stats["bytes"] <= cache.max_bytes  # evicted down to the cap
    assert stats["bytes"] == sum(size for _, size in cache._index.values())  # and every byte accounted for
    assert "old0" not in cache._index and "old149999" in cache._index  # the least recently used went first
    assert not errors
