"""Builds the immutable Snapshot that `decide()` reads, from backends' offers and live load."""

from __future__ import annotations

from collections.abc import Mapping

from backends.protocol import Backend, LoadReport
from policies.schema import LatencyPrior, Policy
from policies.types import BackendKind, BackendView, Health, LatencyModel, Snapshot

from .guard import BackendGuard
from .stats import OutcomeStats

__all__ = ["SnapshotSource"]

_UNKNOWN_PRIOR = LatencyPrior(p50_ms=5_000, p95_ms=30_000)


class SnapshotSource:
    """Reads every backend's offer and load report (in memory, no I/O) into one Snapshot."""

    def __init__(self, backends: Mapping[str, Backend], guards: Mapping[str, BackendGuard] | None = None,
                 stats: OutcomeStats | None = None):
        self._backends = backends
        self._guards = guards or {}
        self.stats = stats or OutcomeStats()

    def current(self, policy: Policy) -> Snapshot:
        return Snapshot(tuple(self._view(b, policy) for b in self._backends.values()))

    def health(self, name: str, load: LoadReport | None = None) -> tuple[Health, str]:
        """The backend's own health, narrowed by its guard (breaker, capacity) when it says OK."""
        load = load or self._backends[name].load()
        guard = self._guards.get(name)
        if load.health is Health.OK and guard is not None:
            health, detail = guard.health()
            if health is not Health.OK:
                return health, detail
        return load.health, load.detail

    def _latency(self, name: str, prior: LatencyPrior, policy: Policy) -> LatencyModel:
        """Observed quantiles once there are enough of them; the configured prior until then."""
        observed = self.stats.get(name)
        if observed is not None and observed.samples >= policy.live_latency_min_samples \
                and self._backends[name].offer.kind is BackendKind.API:
            return LatencyModel(p50_ms=observed.p50_ms, p95_ms=observed.p95_ms)
        return LatencyModel(p50_ms=prior.p50_ms, p95_ms=prior.p95_ms)

    def _view(self, backend: Backend, policy: Policy) -> BackendView:
        offer, load = backend.offer, backend.load()
        bp = policy.backends.get(offer.name)
        prior = (bp.latency_prior if bp else None) or _UNKNOWN_PRIOR
        return BackendView(
            name=offer.name,
            kind=offer.kind,
            health=self.health(offer.name, load)[0],
            models=offer.models,
            sizes=offer.sizes,
            max_n=offer.max_n,
            default_steps=offer.default_steps,
            latency=self._latency(offer.name, prior, policy),
            pool=load.pool,
            **self._live(offer.name),
        )

    def _live(self, name: str) -> dict:
        guard = self._guards.get(name)
        if guard is None:
            return {}
        return {"wait_ms": guard.wait_ms(), "inflight": guard.inflight}
