"""Prometheus metrics, observed from outside the request path: from finished audit records
and, at scrape time, from the snapshot (queue, occupancy, ejection and pacing).

One registry per app (no globals), served at /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .guard import BackendGuard

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_EJECTION_VALUE = {"serving": 0, "recovering": 1, "ejected": 2}


class Metrics:
    def __init__(self, guards: Mapping[str, BackendGuard], pool_model: Callable[[], object | None],
                 audit_backlog: Callable[[], int], degraded: Callable[[], bool] = lambda: False,
                 budget_use: Callable[[], list[tuple[str, str, float, float | None]]] = list):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("imagegw_requests", "Requests by serving backend and outcome",
                                ["backend", "outcome", "status"], registry=self.registry)
        self.latency = Histogram("imagegw_request_latency_seconds", "End-to-end request latency",
                                 ["backend"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.cost = Counter("imagegw_cost_usd", "Cost incurred", ["backend", "tenant"], registry=self.registry)
        self.cost_predicted = Counter("imagegw_cost_predicted_usd", "What served requests were predicted to cost "
                                      "when chosen (against imagegw_cost_usd: price-list drift)", ["backend"],
                                      registry=self.registry)
        self.images = Counter("imagegw_images", "Images delivered", ["backend"], registry=self.registry)
        self.sla_missed = Counter("imagegw_sla_missed", "Requests that missed their SLA", ["tier"],
                                  registry=self.registry)
        self.attempts = Counter("imagegw_backend_attempts", "Backend attempts by outcome and error class",
                                ["backend", "outcome", "error_class"], registry=self.registry)
        self.fallbacks = Counter("imagegw_fallbacks", "Requests served by other than the first candidate",
                                 registry=self.registry)
        self.cached = Counter("imagegw_result_cache_served", "Requests served images an identical one got "
                              "(hit: the result cache; shared: made once for requests in flight together)",
                              ["kind"], registry=self.registry)
        self.saved = Counter("imagegw_result_cache_saved_usd", "What cached and shared answers would have cost",
                             registry=self.registry)
        self._guards, self._pool_model, self._backlog, self._degraded = guards, pool_model, audit_backlog, degraded
        self._budget_use = budget_use
        # Label children by values: prometheus_client's labels() validates and locks on every call, several
        # times per request; the children it returns are the same objects every time.
        self._children: dict[tuple, object] = {}
        self.registry.register(self)  # scrape-time gauges via collect()

    def _child(self, metric, *values: str):
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def observe(self, record: dict) -> None:
        """Fold one finished request's audit record into the counters."""
        backend = record.get("backend") or "none"
        self._child(self.requests, backend, record["outcome"], str(record["status"])).inc()
        self._child(self.latency, backend).observe(record["latency_ms"] / 1000)
        if record.get("cost_usd"):
            self._child(self.cost, backend, record.get("tenant") or "anonymous").inc(record["cost_usd"])
        if record.get("cost_predicted_usd") is not None:
            self._child(self.cost_predicted, backend).inc(record["cost_predicted_usd"])
        if record.get("images"):
            self._child(self.images, backend).inc(record["images"])
        if record.get("sla_met") is False:
            self._child(self.sla_missed, (record.get("decision") or {}).get("tier") or "none").inc()
        if record.get("cache"):
            self._child(self.cached, record["cache"]).inc()
            self.saved.inc(record.get("cost_saved_usd") or 0.0)
        attempts = record.get("attempts") or []
        for a in attempts:
            self._child(self.attempts, a["backend"], a["outcome"], a.get("error_class") or "").inc()
        chosen = (record.get("decision") or {}).get("chosen")
        if record["outcome"] == "ok" and chosen and backend != chosen:
            self.fallbacks.inc()

    def collect(self):
        ejection = GaugeMetricFamily("imagegw_ejection_state",
                                     "Outlier ejection (0 serving, 1 recovering, 2 ejected)", labels=["backend"])
        share = GaugeMetricFamily("imagegw_backend_share", "Share of calls let through (1 serving, 0 ejected)",
                                  labels=["backend"])
        paced = GaugeMetricFamily("imagegw_backend_pacing_wait_seconds",
                                  "How long a call would wait for its turn now (429 pause, requests per minute)",
                                  labels=["backend"])
        inflight = GaugeMetricFamily("imagegw_backend_inflight", "Calls in flight", labels=["backend"])
        for name, guard in self._guards.items():
            ejection.add_metric([name], _EJECTION_VALUE[guard.ejector.state])
            share.add_metric([name], guard.ejector.share)
            paced.add_metric([name], guard.pacer.wait_s())
            inflight.add_metric([name], guard.inflight)
        yield ejection
        yield share
        yield paced
        yield inflight
        pool = self._pool_model()
        if pool is not None:
            yield GaugeMetricFamily("imagegw_local_work_ahead_seconds", "Queued + running work in the pool",
                                    value=pool.work_ahead_s)
            yield GaugeMetricFamily("imagegw_local_batch_occupancy", "Observed images per batch",
                                    value=pool.typical_batch)
            yield GaugeMetricFamily("imagegw_local_workers_ready", "Ready pool workers", value=pool.workers)
        yield GaugeMetricFamily("imagegw_audit_backlog", "Audit records waiting to be written",
                                value=self._backlog())
        labels = ["tenant", "period"]
        spend = GaugeMetricFamily("imagegw_budget_spend_usd", "Tenant spend this period", labels=labels)
        used = GaugeMetricFamily("imagegw_budget_used_ratio", "Tenant spend over its limit", labels=labels)
        for tenant, period, usd, limit in self._budget_use():
            spend.add_metric([tenant, period], usd)
            if limit:
                used.add_metric([tenant, period], usd / limit)
        yield spend
        yield used
        yield GaugeMetricFamily("imagegw_state_degraded", "1 while the shared state store is unreachable",
                                value=float(self._degraded()))

    def describe(self):
        return []

    def render(self) -> bytes:
        return generate_latest(self.registry)
