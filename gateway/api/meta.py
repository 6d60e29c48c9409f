"""Models, backends, health and readiness."""

from __future__ import annotations

from collections.abc import Mapping

from litestar import Response, get

from backends.protocol import Backend
from policies.costs import local_cost_usd, predicted_cost_usd
from policies.types import Health, PoolModel, RouteRequest

from ..audit import AuditLog
from ..guard import BackendGuard
from ..policy_admin import PolicyRegistry
from ..snapshot import SnapshotSource
from ..state import StateStore

__all__ = ["healthz", "list_backends", "list_models", "readyz"]

_REFERENCE = RouteRequest(width=1024, height=1024)  # what /v1/backends quotes prices and latency for


@get("/v1/models", summary="Models a request may name (OpenAI list shape)")
async def list_models(backends: Mapping[str, Backend]) -> dict:
    ids = ["auto"]
    for name, backend in backends.items():
        ids.append(name)
        ids.extend(f"{name}/{m}" for m in backend.offer.models)
    return {"object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "imagegw"} for i in ids]}


@get("/v1/backends", summary="Each backend's status, predicted latency and live cost per image")
async def list_backends(backends: Mapping[str, Backend], policy: PolicyRegistry, snapshots: SnapshotSource,
                        guards: Mapping[str, BackendGuard]) -> dict:
    current = policy.current
    snapshot = snapshots.current(current)
    out = []
    for view in snapshot.backends:
        backend, bp = backends[view.name], current.backends.get(view.name)
        load = backend.load()
        steps = view.default_steps
        guard = guards.get(view.name)
        out.append({
            "name": view.name, "kind": view.kind.value, "health": view.health.value,
            "detail": snapshots.health(view.name, load)[1], "models": list(view.models), "max_n": view.max_n,
            "ejection": guard.status() if guard else None,
            "inflight": guard.inflight if guard else None,
            "sandbox": backend.offer.sandbox, "enabled": bool(bp and bp.enabled),
            "quality": bp.quality if bp else None,
            "reference_request": "1024x1024, n=1, default steps",
            "predicted_latency_ms": {
                q: round(view.latency.predict(_REFERENCE, steps, q, view.pool), 1) for q in ("p50", "p95")
            },
            **(_pool_figures(view.pool, steps) if view.pool else {}),
            "cost_per_image_usd": (
                predicted_cost_usd(view, bp, _REFERENCE, steps, current.cost_accounting) if bp else None
            ),
        })
    return {"object": "list", "policy_version": policy.version.version, "policy_fingerprint": current.fingerprint,
            "data": out}


def _pool_figures(pool: PoolModel, steps: int) -> dict:
    """The local pool's live queue and both cost views, for ops."""
    per_image_s = pool.gpu_seconds_per_image(_REFERENCE, steps)
    return {
        "pool": {
            "workers": pool.workers, "busy_workers": pool.busy_workers,
            "work_ahead_s": round(pool.work_ahead_s, 3),
            "typical_batch": round(pool.typical_batch, 2), "has_headroom": pool.has_headroom,
            "gpu_seconds_per_image": round(per_image_s, 4),
            "cost_per_image_usd": {"amortized": local_cost_usd(per_image_s, pool.gpu_hour_usd),
                                   "marginal": 0.0 if pool.has_headroom else local_cost_usd(per_image_s,
                                                                                            pool.gpu_hour_usd)},
        }
    }


@get("/healthz", summary="Liveness")
async def healthz() -> dict:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: at least one backend can serve and the audit log is writing")
async def readyz(backends: Mapping[str, Backend], audit: AuditLog, snapshots: SnapshotSource,
                 store: StateStore) -> Response:
    states = {}
    for name in backends:
        health, detail = snapshots.health(name)
        # Unauthenticated: health, never upstream text (an ejection's reason may quote a provider).
        states[name] = {"health": health.value,
                        "detail": detail if health in (Health.WARMING, Health.UNCONFIGURED, Health.OK) else ""}
    serving = [n for n, s in states.items() if s["health"] == Health.OK.value]
    warming = [n for n, s in states.items() if s["health"] == Health.WARMING.value]
    ready = bool(serving)
    body = {"status": ("degraded" if store.degraded else "ready") if ready else "not_ready", "serving": serving,
            "warming": warming, "backends": states, "audit_backlog": audit.backlog,
            "shared_state": "unreachable: serving on this replica's local view" if store.degraded else "ok"}
    return Response(body, status_code=200 if ready else 503)
