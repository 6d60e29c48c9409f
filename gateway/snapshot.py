"""Builds the immutable Snapshot that `decide()` reads, from backends' offers and live load."""

from __future__ import annotations

from collections.abc import Mapping

from backends.protocol import Backend, LoadReport
from policies.schema import LatencyPrior, Policy
from policies.types import BackendView, Health, LatencyModel, Snapshot

from .guard import BackendGuard

__all__ = ["SnapshotSource"]

_UNKNOWN_PRIOR = LatencyPrior(p50_ms=5_000, p95_ms=30_000)


class SnapshotSource:
    """Reads every backend's offer and load report (in memory, no I/O) into one Snapshot."""

    def __init__(self, backends: Mapping[str, Backend], guards: Mapping[str, BackendGuard] | None = None):
        self._backends = backends
        self._guards = guards or {}

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
            latency=LatencyModel(p50_ms=prior.p50_ms, p95_ms=prior.p95_ms),
            pool=load.pool,
        )
