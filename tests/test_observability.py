"""Metrics and live latency: observed from finished requests, never on the request path."""

from __future__ import annotations

import httpx

from gateway.stats import OutcomeStats
from policies.types import BackendKind
from tests.fakes import ScriptedBackend


def test_metrics_count_requests_latency_cost_and_expose_pool_and_ejection(settings, shipped_policy, serve):
    backends = {"local": ScriptedBackend("local", kind=BackendKind.LOCAL, models=("tiny",))}
    server = serve(settings, shipped_policy, backends)
    for _ in range(3):
        assert httpx.post(server.base_url + "/v1/images/generations",
                          json={"prompt": "x", "size": "256x256"}).status_code == 200
    httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "x", "n": 0})
    scrape = httpx.get(server.base_url + "/metrics")
    assert scrape.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"  # one charset
    text = scrape.text
    assert 'imagegw_requests_total{backend="local",outcome="ok",status="200"} 3.0' in text
    assert 'imagegw_requests_total{backend="none",outcome="error",status="400"} 1.0' in text
    assert "imagegw_request_latency_seconds_bucket" in text and "imagegw_cost_usd_total" in text
    assert "imagegw_ejection_state" in text and "imagegw_backend_pacing_wait_seconds" in text
    assert "imagegw_local_work_ahead_seconds" in text and "imagegw_audit_backlog" in text


def test_latency_quantiles_over_a_sliding_window():
    now = [0.0]
    stats = OutcomeStats(window_s=60, clock=lambda: now[0])
    for ms in range(1, 101):
        stats.add("reve", float(ms), ok=True)
    stats.add("reve", 5000.0, ok=False)
    got = stats.get("reve")
    assert got.samples == 100 and 49 <= got.p50_ms <= 52 and 94 <= got.p95_ms <= 96
    assert abs(got.error_rate - 1 / 101) < 1e-9
    now[0] = 61
    assert stats.get("reve").samples == 0


def test_snapshot_switches_from_prior_to_observed_latency_once_enough_samples(settings, shipped_policy):
    from gateway.snapshot import SnapshotSource

    fast = ScriptedBackend("reve", models=("reve-create",))
    source = SnapshotSource({"reve": fast})
    assert source.current(shipped_policy).get("reve").latency.p95_ms == 15_000  # the prior
    for _ in range(shipped_policy.live_latency_min_samples):
        source.stats.add("reve", 800.0, ok=True)
    assert source.current(shipped_policy).get("reve").latency.p95_ms == 800.0
