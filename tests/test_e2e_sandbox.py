"""End to end over real HTTP: the gateway routes to the sandboxed providers while faults are injected."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import pytest
from PIL import Image

from backends.sandbox import SandboxConfig
from gateway.audit import open_reader
from gateway.registry import build_backends
from policies.schema import Policy

FAST = {"latency_p50_ms": 20, "latency_p95_ms": 80, "hang_s": 30, "retry_after_s": 0.2}
FAULTY = {**FAST, "error_rate": 0.08, "rate_limit_rate": 0.04, "hang_rate": 0.04, "malformed_rate": 0.04}


def e2e_policy(**prices) -> Policy:
    price = {"seedream": 0.035, "gemini": 0.134, "reve": 0.024, "bria": 0.04, **prices}
    return Policy.model_validate({
        "defaults": {"tier": "standard", "sla_ms": 15_000},
        "tiers": {"standard": {"min_quality": 0.5}},
        "backends": {name: {"quality": 0.8, "price_per_image_usd": p, "latency_prior": {"p50_ms": 100, "p95_ms": 500}}
                     for name, p in price.items()},
        "dispatch": {"max_attempts_per_backend": 2, "backoff_initial_ms": 20, "backoff_max_ms": 100},
    })


@pytest.fixture
def sandboxed(settings, serve, tmp_path):
    """A gateway whose four providers are the sandbox (local pool off), with a fault profile."""

    def start(profile: dict, policy: Policy, **ejection):
        settings.local.enabled = False
        settings.sandbox.mode = "on"
        faults = tmp_path / "faults.yaml"
        faults.write_text(SandboxConfig.model_validate(
            {p: profile for p in ("seedream", "gemini", "reve", "bria")}).model_dump_json())
        settings.sandbox.config_file = faults
        for provider in settings.backends.values():
            provider.timeout_s = 1.0
            provider.options = {**provider.options, "poll_initial_s": 0.02, "poll_max_s": 0.05}
        settings.ejection = settings.ejection.model_copy(update=ejection)
        built = build_backends(settings)
        return serve(settings, policy, built), built.sandbox_url

    return start


async def _fire(base_url: str, bodies: list[dict], concurrency: int = 16) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async def one(body):
            async with sem:
                return await client.post("/v1/images/generations", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_with_20_percent_faults_on_every_provider_every_request_gets_images_or_a_clear_error(sandboxed, settings):
    server, _ = sandboxed(FAULTY, e2e_policy())
    sizes = ["1024x1024", "1536x1024", "1024x1536", "2048x2048"]
    bodies = [{"prompt": f"prompt {i}", "size": sizes[i % 4], "n": 1 + i % 2, "seed": i} for i in range(120)]
    responses = asyncio.run(_fire(server.base_url, bodies))
    ok = [r for r in responses if r.status_code == 200]
    for r in responses:
        if r.status_code == 200:
            data = r.json()["data"]
            assert data and all(Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).format == "PNG" for d in data)
            assert r.headers["x-gateway-sandbox"] == "true"
        else:  # a clear error: OpenAI's shape, what was tried
            assert r.status_code in (502, 503, 504), r.text
            err = r.json()["error"]
            assert err["message"] and err["code"] and ("attempts" in err or "rejected" in err)
    print(f"\n{len(ok)}/{len(bodies)} served; statuses: {sorted({r.status_code for r in responses})}")
    assert len(ok) >= 0.97 * len(bodies), [r.status_code for r in responses]
    assert len({r.headers["x-gateway-backend"] for r in ok}) >= 2  # fallbacks spread across providers
    server.stop()
    reader = open_reader(settings)
    assert reader.count() == len(bodies)
    records = reader.recent(limit=500)
    assert sum(1 for r in records if len(r["attempts"]) > 1) > 0  # some were served after a retry or fallback
    assert all(r["sandbox"] for r in records if r["outcome"] == "ok")


def _backend(server, name: str) -> dict:
    return next(b for b in httpx.get(server.base_url + "/v1/backends").json()["data"] if b["name"] == name)


def test_a_failing_provider_is_ejected_and_comes_back_on_a_share_of_traffic_when_it_heals(sandboxed):
    # seedream is cheapest, so it is tried first; reve is the fallback.
    policy = e2e_policy(seedream=0.001, gemini=0.5, bria=0.5)
    server, sandbox_url = sandboxed(FAST, policy, consecutive_failures=3, base_ejection_s=1.0)
    broken = SandboxConfig.model_validate({"seedream": {**FAST, "error_rate": 1.0},
                                           **{p: FAST for p in ("gemini", "reve", "bria")}})
    httpx.put(sandbox_url + "/_sandbox/config", content=broken.model_dump_json())
    body = {"prompt": "p", "size": "1024x1024"}
    for _ in range(3):
        r = httpx.post(server.base_url + "/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 200 and r.headers["x-gateway-backend"] == "reve"
    seedream = _backend(server, "seedream")
    assert seedream["ejection"]["state"] == "ejected" and seedream["health"] == "open"
    assert "consecutive failures" in seedream["ejection"]["reason"] and seedream["ejection"]["until"] > time.time()
    calls_while_ejected = httpx.get(sandbox_url + "/_sandbox/stats").json()["seedream.requests"]
    r = httpx.post(server.base_url + "/v1/images/generations", json=body, timeout=30)
    assert r.headers["x-gateway-backend"] == "reve"
    assert httpx.get(sandbox_url + "/_sandbox/stats").json()["seedream.requests"] == calls_while_ejected

    healed = SandboxConfig.model_validate({p: FAST for p in ("seedream", "gemini", "reve", "bria")})
    httpx.put(sandbox_url + "/_sandbox/config", content=healed.model_dump_json())
    until = time.monotonic() + 10
    while _backend(server, "seedream")["ejection"]["state"] == "ejected" and time.monotonic() < until:
        time.sleep(0.05)
    served = []
    while _backend(server, "seedream")["ejection"]["state"] != "serving" and len(served) < 40:
        r = httpx.post(server.base_url + "/v1/images/generations", json=body, timeout=30)
        assert r.status_code == 200
        served.append(r.headers["x-gateway-backend"])
    # recovering: a share of the traffic (not one probe) went back to seedream until it was in full service
    assert "seedream" in served and "reve" in served
    assert _backend(server, "seedream")["ejection"]["state"] == "serving"


def test_every_provider_serves_through_the_sandbox_by_name(sandboxed):
    server, _ = sandboxed(FAST, e2e_policy())
    for name in ("seedream", "gemini", "reve", "bria"):
        for fmt in ("b64_json", "url"):
            r = httpx.post(server.base_url + "/v1/images/generations", timeout=30,
                           json={"prompt": "p", "size": "1024x1024", "model": name, "response_format": fmt})
            assert r.status_code == 200, (name, fmt, r.text)
            assert r.headers["x-gateway-backend"] == name
            item = r.json()["data"][0]
            data = base64.b64decode(item["b64_json"]) if fmt == "b64_json" else httpx.get(item["url"]).content
            assert Image.open(io.BytesIO(data)).format == "PNG"


def test_sandbox_speaks_like_the_providers_sdks_call_it():
    """Nulls for unset fields (BytePlus SDK), Accept: image/png with metadata headers (Reve SDK),
    the v1 API path (google-genai's default), and Bria's absolute status_url."""
    from litestar.testing import TestClient

    from backends.sandbox import create_sandbox_app

    fast = {"latency_p50_ms": 1, "latency_p95_ms": 2}
    app = create_sandbox_app(SandboxConfig.model_validate({p: fast for p in ("seedream", "gemini", "reve", "bria")}))
    with TestClient(app) as c:
        r = c.post("/seedream/api/v3/images/generations", headers={"authorization": "Bearer k"},
                   json={"model": "seedream-4-0-250828", "prompt": "p", "size": "1024x1024", "seed": None,
                         "image": None, "response_format": "b64_json", "watermark": None})
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
        r = c.post("/reve/v1/image/create", headers={"authorization": "Bearer k", "accept": "image/png"},
                   json={"prompt": "p", "aspect_ratio": "16:9"})
        assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
        assert r.headers["x-reve-credits-used"] == "18" and r.headers["x-reve-content-violation"] == "false"
        r = c.post("/gemini/v1/models/gemini-2.5-flash-image:generateContent", headers={"x-goog-api-key": "k"},
                   json={"contents": [{"parts": [{"text": "p"}]}]})
        assert r.status_code == 200 and r.json()["candidates"][0]["content"]["parts"][1]["inlineData"]["data"]
        submitted = c.post("/bria/v2/image/generate", headers={"api_token": "k"}, json={"prompt": "p"}).json()
        status_path = "/" + submitted["status_url"].split("/", 3)[3]
        for _ in range(100):
            status = c.get(status_path, headers={"api_token": "k"}).json()
            if status["status"] != "IN_PROGRESS":
                break
            time.sleep(0.01)
        assert status["status"] == "COMPLETED" and status["result"]["image_url"]


def test_imagegw_sandbox_serves_the_emulators_with_the_faults_file_it_is_given(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    faults = tmp_path / "faults.yaml"
    faults.write_text("seed: 3\nreve: {latency_p50_ms: 1, latency_p95_ms: 2, error_rate: 1.0}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sandbox", "--faults", str(faults),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                config = httpx.get(f"http://127.0.0.1:{port}/_sandbox/config", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the sandbox did not come up"
                time.sleep(0.1)
        assert config["seed"] == 3 and config["reve"]["error_rate"] == 1.0
        r = httpx.post(f"http://127.0.0.1:{port}/reve/v1/image/create", json={"prompt": "p"},
                       headers={"authorization": "Bearer k", "accept": "application/json"})
        assert r.status_code >= 500  # the fault file's 100% error rate, as Reve answers it
    finally:
        proc.terminate()
        proc.wait(timeout=10)
