"""Self-host or buy: replay one trace with the real policy across pool sizes and GPU prices.

For each GPU price (reserved or on demand, H100 or H200, as ops configure them) and each pool size from 0 to N
GPUs: total cost (the APIs' bills plus the GPUs for the whole horizon, paid busy or idle), cost per image, SLA
attainment per tier and GPU utilisation. Then the cost-optimal size (the cheapest that meets `min_sla`, else the
one with the best SLA), the request rate at which one more GPU pays for itself (the same trace replayed faster
until the next size is the cheaper), and how the optimum moves if the APIs' prices change by +-20%.

Pure: the simulator's world and the policy in, plain data out (no I/O, no clock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .schema import Policy
from .simulate import PoolSpec, World, simulate
from .traces import TraceRequest

__all__ = ["PlanRow", "PricePlan", "plan", "with_api_prices"]

RATE_STEPS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)  # trace speed-ups tried for the break-even rate


@dataclasses.dataclass(frozen=True, slots=True)
class PlanRow:
    gpus: int
    total_cost_usd: float
    api_spend_usd: float
    gpu_cost_usd: float
    cost_per_image_usd: float | None
    cost_per_sla_met_image_usd: float | None
    sla_attainment: float
    sla_by_tier: dict[str, float]
    gpu_utilisation: float


@dataclasses.dataclass(frozen=True, slots=True)
class PricePlan:
    """One GPU price: a row per pool size, the optimum, the break-even rate for one more GPU, the sensitivity."""

    name: str
    gpu_hour_usd: float
    rows: tuple[PlanRow, ...]
    optimal_gpus: int
    # The request rate (requests/s) at which optimal_gpus + 1 GPUs cost no more than optimal_gpus; None when no
    # speed-up tried (up to 8x) gets there.
    break_even_rate_per_s: float | None
    optimal_gpus_if_api_prices: dict[str, int]  # "-20%" / "+20%" -> the optimum then

    def to_json(self) -> dict:
        return {"name": self.name, "gpu_hour_usd": self.gpu_hour_usd, "optimal_gpus": self.optimal_gpus,
                "break_even_rate_per_s": self.break_even_rate_per_s,
                "optimal_gpus_if_api_prices": self.optimal_gpus_if_api_prices,
                "rows": [dataclasses.asdict(r) for r in self.rows]}


def with_api_prices(policy: Policy, factor: float) -> Policy:
    """The policy with every API price (per image, price-list lines, billed units) scaled by `factor`."""
    data = policy.model_dump(mode="json")
    for backend in data["backends"].values():
        if backend.get("price_per_image_usd") is not None:
            backend["price_per_image_usd"] *= factor
        for row in backend.get("prices") or ():
            row["usd_per_image"] *= factor
        if backend.get("billed"):
            backend["billed"]["usd"] *= factor
    return Policy.model_validate(data)


def _world(world: World, pool: PoolSpec, gpus: int, gpu_hour_usd: float) -> World:
    if gpus == 0:
        return dataclasses.replace(world, pool=None)
    return dataclasses.replace(world, pool=dataclasses.replace(pool, gpus=gpus, gpu_hour_usd=gpu_hour_usd))


def _row(trace: list[TraceRequest], policy: Policy, world: World, gpus: int, seed: int) -> PlanRow:
    s = simulate(trace, policy, world, seed=seed).summary()
    return PlanRow(gpus, round(s["total_cost_usd"], 4), s["api_spend_usd"], s["gpu_cost_usd"],
                   s["cost_per_image_usd"], s["cost_per_sla_met_image_usd"], round(s["sla_attainment"], 5),
                   {t: round(v, 5) for t, v in s["sla_by_tier"].items()}, round(s["gpu_utilisation"], 4))


def _optimal(rows: list[PlanRow], min_sla: float) -> int:
    meeting = [r for r in rows if r.sla_attainment >= min_sla]
    if meeting:
        return min(meeting, key=lambda r: (r.total_cost_usd, r.gpus)).gpus
    return max(rows, key=lambda r: (r.sla_attainment, -r.total_cost_usd)).gpus


def _faster(trace: list[TraceRequest], k: float) -> list[TraceRequest]:
    return [dataclasses.replace(r, t=r.t / k) for r in trace]


def plan(trace: list[TraceRequest], policy: Policy, world: World, pool: PoolSpec, *, max_gpus: int,
         gpu_prices: dict[str, float], min_sla: float = 0.99, seed: int = 0,
         progress: Callable[[str], None] | None = None) -> list[PricePlan]:
    """`pool` describes one GPU of the pool (profile, batching); `world` the APIs. One PricePlan per price."""
    if not trace:
        raise ValueError("the trace is empty")
    horizon = max(r.t for r in trace) or 1.0
    base_rate = len(trace) / horizon
    sizes = range(max_gpus + 1)
    out = []
    for name, usd in gpu_prices.items():
        def sweep(p: Policy, t: list[TraceRequest], usd=usd) -> list[PlanRow]:
            return [_row(t, p, _world(world, pool, g, usd), g, seed) for g in sizes]

        if progress:
            progress(f"{name}: {len(sizes)} pool sizes")
        rows = sweep(policy, trace)
        best = _optimal(rows, min_sla)
        sensitivity = {}
        for label, factor in (("-20%", 0.8), ("+20%", 1.2)):
            if progress:
                progress(f"{name}: API prices {label}")
            sensitivity[label] = _optimal(sweep(with_api_prices(policy, factor), trace), min_sla)
        out.append(PricePlan(name, usd, tuple(rows), best, _break_even(trace, policy, world, pool, best, usd,
                                                                         base_rate, seed, progress, name),
                             sensitivity))
    return out


def _break_even(trace, policy, world, pool, gpus, usd, base_rate, seed, progress, name) -> float | None:
    """The first speed-up of the trace at which one more GPU costs no more than `gpus` (SLA no worse)."""
    for k in RATE_STEPS:
        if progress:
            progress(f"{name}: {gpus + 1} vs {gpus} GPUs at {k}x the rate")
        faster = _faster(trace, k)
        now = _row(faster, policy, _world(world, pool, gpus, usd), gpus, seed)
        more = _row(faster, policy, _world(world, pool, gpus + 1, usd), gpus + 1, seed)
        if more.total_cost_usd <= now.total_cost_usd and more.sla_attainment >= now.sla_attainment - 1e-9:
            return round(base_rate * k, 4)
    return None
