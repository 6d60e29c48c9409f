"""Cost per request: API list prices and the local pool's GPU-time model (design.md, Cost accounting)."""

from __future__ import annotations

from .schema import BackendPolicy, CostAccounting
from .types import BackendView, RouteRequest

__all__ = ["local_cost_usd", "predicted_cost_usd", "settled_cost_usd"]


def local_cost_usd(gpu_seconds: float, gpu_hour_usd: float) -> float:
    """What GPU time costs at the given hourly price."""
    return gpu_hour_usd / 3600.0 * gpu_seconds


def predicted_cost_usd(
    view: BackendView,
    backend_policy: BackendPolicy,
    request: RouteRequest,
    steps: int,
    accounting: CostAccounting,
) -> float:
    """The cost of serving this request on this backend, before it runs."""
    if view.pool is None:
        return backend_policy.price_per_image(request.megapixels, request.quality, request.model) * request.n
    pool = view.pool
    if accounting is CostAccounting.MARGINAL and pool.has_headroom:
        return 0.0
    return local_cost_usd(pool.gpu_seconds_per_image(request, steps) * request.n, pool.gpu_hour_usd)


def settled_cost_usd(
    view: BackendView,
    backend_policy: BackendPolicy,
    accounting: CostAccounting,
    images: int,
    gpu_seconds: float | None,
    predicted: float,
    *,
    billed_units: float | None = None,
    per_image_usd: float | None = None,
) -> float:
    """What a finished request cost: the provider's reported usage times its unit price (policy `billed`) when
    it reported one, else the price list per image delivered (`per_image_usd`, the request's line), or the GPU
    time it used."""
    if view.pool is None:
        if backend_policy.billed is not None and billed_units is not None:
            return backend_policy.billed.usd * billed_units
        price = per_image_usd if per_image_usd is not None else (backend_policy.price_per_image_usd or 0.0)
        return price * images
    if accounting is CostAccounting.MARGINAL and predicted == 0.0:
        return 0.0
    if gpu_seconds is None:
        return predicted
    return local_cost_usd(gpu_seconds, view.pool.gpu_hour_usd)
