"""Errors say whether retrying can help, in the headers the OpenAI SDKs read: x-should-retry: false where it
cannot (no candidate meets the SLA or the ceiling, a budget spent), Retry-After where it can."""

from __future__ import annotations

import httpx
import openai
import pytest

from backends.errors import BackendTransientError
from gateway.audit import open_reader
from gateway.ejection import EjectionConfig
from gateway.guard import BackendGuard
from gateway.registry import Backends
from policies.schema import Policy
from tests.fakes import ScriptedBackend

POLICY = {"defaults": {"tier": "standard", "sla_ms": 10_000}, "tiers": {"standard": {"min_quality": 0.5}},
          "backends": {"reve": {"quality": 0.8, "price_per_image_usd": 0.024,
                                "latency_prior": {"p50_ms": 100, "p95_ms": 500}}},
          "dispatch": {"max_attempts_per_backend": 1}}


@pytest.fixture
def gateway(settings, serve):
    def start(policy=POLICY, fail=False):
        settings.local.enabled = False
        backends = {"reve": ScriptedBackend("reve", fail=(lambda j: BackendTransientError("500")) if fail else None)}
        guards = {"reve": BackendGuard("reve", ejection=EjectionConfig(consecutive_failures=1, base_ejection_s=30))}
        return serve(settings, Policy.model_validate(policy), Backends(backends, guards))
    return start


def post(server, **body):
    return httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "p", "size": "1024x1024", **body})


def test_no_candidate_within_the_sla_says_do_not_retry_and_the_openai_sdk_does_not(gateway, settings):
    server = gateway()
    r = post(server, sla_ms=100)
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=3)
    with pytest.raises(openai.InternalServerError):
        client.images.generate(prompt="p", size="1024x1024", extra_body={"sla_ms": 100})
    server.stop()
    assert open_reader(settings).count() == 2  # one request, not four


def test_everything_ejected_says_when_to_retry(gateway):
    server = gateway(fail=True)
    assert post(server).status_code == 502  # fails and ejects it for 30 s
    r = post(server)
    assert r.status_code == 503 and 25 <= int(r.headers["retry-after"]) <= 30
    assert "x-should-retry" not in r.headers
    assert r.json()["error"]["rejected"][0]["reason"] == "unhealthy"


def test_a_spent_budget_says_do_not_retry_and_when_it_resets(gateway):
    server = gateway({**POLICY, "budgets": {"default": {"daily_usd": 0.03}}})
    assert post(server).status_code == 200
    r = post(server)
    assert r.status_code == 429 and r.headers["x-should-retry"] == "false"
    assert 0 < int(r.headers["retry-after"]) <= 86400
