"""`imagegw plan` and POST /admin/plan: how many GPUs to run against the per-image APIs (policies/plan.py),
on this gateway's world (pool profile, API priors or fitted latencies), as text, JSON and an HTML report."""

from __future__ import annotations

import dataclasses
import html

from policies.plan import PricePlan, plan
from policies.profile import ThroughputProfile
from policies.schema import Policy
from policies.traces import TraceRequest

from .settings import Settings
from .simulation import build_world

__all__ = ["render_plan_html", "render_plan_text", "run_plan"]

MAX_GPUS = 16


def run_plan(settings: Settings, policy: Policy, trace: list[TraceRequest], *, max_gpus: int = 4,
             gpu_prices: dict[str, float] | None = None, min_sla: float = 0.99, seed: int = 0,
             records: list[dict] | None = None, profile: ThroughputProfile | None = None,
             progress=None) -> list[PricePlan]:
    """`profile`: a throughput profile to plan with (a GPU not owned yet: e.g. the H100 SDXL one in
    benchmarks/profiles/); default: this pool's own, as measured."""
    if not 0 <= max_gpus <= MAX_GPUS:
        raise ValueError(f"max_gpus: 0 to {MAX_GPUS}")
    prices = gpu_prices or settings.local.gpu_prices or {"configured": settings.local.gpu_hour_usd}
    if any(not isinstance(v, int | float) or v < 0 for v in prices.values()):
        raise ValueError("gpu_prices: hourly rates in USD, >= 0")
    world = build_world(settings, policy, 1, records)
    if world.pool is None:
        raise ValueError("the local pool is disabled (or not in the policy): nothing to size")
    pool = world.pool
    if profile is not None:
        models = sorted({key[0] for key in profile.table})
        if not models:
            raise ValueError("profile: it has no measurements")
        pool = dataclasses.replace(pool, profile=profile, model=models[0], max_batch=profile.max_batch)
    return plan(trace, policy, world, pool, max_gpus=max_gpus, gpu_prices=dict(prices), min_sla=min_sla,
                seed=seed, progress=progress)


def render_plan_text(plans: list[PricePlan], requests: int) -> str:
    lines = []
    for p in plans:
        lines.append(f"\n## {p.name}: ${p.gpu_hour_usd:.2f}/GPU-hour ({requests} requests)")
        tiers = sorted({t for r in p.rows for t in r.sla_by_tier})
        lines.append("| GPUs | total $ | API $ | GPU $ | $/image | $/SLA-met image | SLA | "
                     + " | ".join(tiers) + " | GPU util |")
        lines.append("|---" * (8 + len(tiers)) + "|")
        for r in p.rows:
            mark = " **" if r.gpus == p.optimal_gpus else ""
            lines.append(f"| {r.gpus}{mark} | {r.total_cost_usd:.2f} | {r.api_spend_usd:.2f} | {r.gpu_cost_usd:.2f} "
                         f"| {_usd(r.cost_per_image_usd)} | {_usd(r.cost_per_sla_met_image_usd)} "
                         f"| {r.sla_attainment:.2%} | "
                         + " | ".join(f"{r.sla_by_tier.get(t, 0):.1%}" for t in tiers)
                         + f" | {r.gpu_utilisation:.0%} |")
        even = (f"{p.break_even_rate_per_s} requests/s" if p.break_even_rate_per_s is not None
                else "not within 8x this trace's rate")
        lines.append(f"\ncost-optimal: {p.optimal_gpus} GPU(s); one more pays for itself at {even}; "
                     f"with API prices -20%: {p.optimal_gpus_if_api_prices['-20%']}, "
                     f"+20%: {p.optimal_gpus_if_api_prices['+20%']}")
    return "\n".join(lines).lstrip("\n")


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def _svg(plans: list[PricePlan]) -> str:
    """Total cost against pool size, one line per GPU price (hand-drawn SVG: no plotting dependency)."""
    w, h, pad = 640, 320, 50
    costs = [r.total_cost_usd for p in plans for r in p.rows]
    top, n = max(costs) or 1.0, max(len(p.rows) for p in plans) - 1 or 1
    colours = ["#1f4e9a", "#a3271f", "#1c6b2e", "#6b3f99"]

    def xy(g: int, c: float) -> tuple[float, float]:
        return pad + g * (w - 2 * pad) / n, h - pad - c / top * (h - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="total cost by pool size">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
             f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">GPUs in the pool</text>',
             f'<text x="12" y="{pad - 15}">total cost $ (max {top:.2f})</text>']
    for g in range(n + 1):
        x, _ = xy(g, 0)
        parts.append(f'<text x="{x}" y="{h - pad + 16}" text-anchor="middle">{g}</text>')
    for i, p in enumerate(plans):
        colour = colours[i % len(colours)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(r.gpus, r.total_cost_usd) for r in p.rows))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        best = next(r for r in p.rows if r.gpus == p.optimal_gpus)
        bx, by = xy(best.gpus, best.total_cost_usd)
        parts.append(f'<circle cx="{bx:.1f}" cy="{by:.1f}" r="5" fill="{colour}"/>')
        parts.append(f'<text x="{w - pad - 150}" y="{pad + 18 * i}" fill="{colour}">'
                     f'{html.escape(p.name)} ${p.gpu_hour_usd:.2f}/h</text>')
    return "".join(parts) + "</svg>"


def render_plan_html(plans: list[PricePlan], requests: int, title: str) -> str:
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif}}pre{{background:#f4f4f4;padding:1em}}</style>"
            f"<h1>{html.escape(title)}</h1>{_svg(plans)}<pre>{html.escape(render_plan_text(plans, requests))}</pre>")
