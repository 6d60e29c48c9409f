"""Routing economics: our policy against the strategies other gateways offer, on synthetic traces.

Every strategy routes the same trace through the same world: 2 reserved H100s running SDXL
(1024x1024, 30 steps) at the throughput measured in docs/benchmarks.md, and the four APIs at
their list prices with lognormal latencies and failure rates. Cost per image counts the API
bills plus the reserved GPUs for the whole trace (paid busy or idle). The lower bound is an
offline relaxation: the GPUs' cost, plus the cheapest eligible API for every image that
cannot fit on the pool even if the pool ran every image at its best batch efficiency.

Run: .venv/bin/python benchmarks/routing_economics.py [--duration 3600] [--rate 0.6] [--gpus 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from policies.profile import ThroughputProfile  # noqa: E402
from policies.schema import Policy  # noqa: E402
from policies.simulate import ApiModel, PoolSpec, Strategy, World, simulate, with_rule  # noqa: E402
from policies.traces import synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Measured on an H100 (docs/benchmarks.md): SDXL 1024x1024, 30 steps, our compiled bf16 engine.
SDXL_H100 = ThroughputProfile({("sdxl", 1024, 1024, 30): {1: 1.027, 8: 7.159}}, max_batch=8)
APIS = (ApiModel("seedream", 8000, 20000, 0.02), ApiModel("gemini", 12000, 30000, 0.01),
        ApiModel("reve", 6000, 15000, 0.02), ApiModel("bria", 10000, 25000, 0.03))
NO_SLA = 10**9


def world(gpus: int) -> World:
    return World(APIS, PoolSpec(SDXL_H100, "sdxl", gpus=gpus, max_batch=8, max_wait_s=0.1))


def strategies(policy: Policy) -> list[Strategy]:
    cheapest_api = min((n for n, b in policy.backends.items() if b.price_per_image_usd),
                       key=lambda n: policy.backends[n].price_per_image_usd)

    def split(route, rng):  # half to the pool, half to the cheapest API, blind to everything else
        import dataclasses

        return dataclasses.replace(route, backend="local" if rng.random() < 0.5 else cheapest_api)

    blind = {"sla_ms": NO_SLA}
    return [
        Strategy("ours (SLA-aware, live queue and cost)", policy),
        Strategy("all-local (queue everything)", with_rule(policy, {"name": "b", "allow": ["local"], **blind})),
        Strategy("cheapest API only", with_rule(policy, {"name": "b", "deny": ["local"], **blind})),
        Strategy("cost-based, blind to queue and SLA", with_rule(policy, {"name": "b", **blind}), queue_blind=True),
        Strategy("latency-based (fastest recent)", with_rule(policy, {"name": "b", "objective": "min_latency",
                                                                       **blind}), recent_latency=True),
        Strategy("static 50/50 split", with_rule(policy, {"name": "b", **blind}), tweak=split),
    ]


def lower_bound(trace, policy: Policy, w: World) -> float:
    """GPU cost + cheapest eligible API for the images the pool cannot take even at full efficiency."""
    pool = w.pool
    horizon = trace[-1].t
    per_image = pool.profile.seconds_per_image(pool.model, 1024, 1024, 30, pool.max_batch)
    capacity = pool.gpus * horizon / per_image
    local_quality = policy.backends["local"].quality
    one_alone_ms = pool.profile.seconds(pool.model, 1024, 1024, 30, 1) * 1000 + pool.fixed_p95_ms
    forced, flexible = [], 0
    for r in trace:
        tier = policy.tiers[r.tier or policy.defaults.tier]
        if tier.min_quality > local_quality or (r.sla_ms or NO_SLA) < one_alone_ms:
            forced.append(r)
        else:
            flexible += r.n

    def cheapest(r):
        tier = policy.tiers[r.tier or policy.defaults.tier]
        return min(b.price_per_image_usd for b in policy.backends.values()
                   if b.price_per_image_usd and b.quality >= tier.min_quality)

    overflow = max(0.0, flexible - capacity)
    cheapest_standard = min(b.price_per_image_usd for b in policy.backends.values() if b.price_per_image_usd)
    return pool.gpus * horizon / 3600 * pool.gpu_hour_usd + sum(cheapest(r) * r.n for r in forced) \
        + overflow * cheapest_standard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3600)
    p.add_argument("--rate", type=float, default=0.6, help="mean requests per second (base rate)")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--traces", default="steady,diurnal,bursty,flash_crowd")
    args = p.parse_args()
    policy = Policy.model_validate(yaml.safe_load((ROOT / "config" / "policy.yaml").read_text()))
    w = world(args.gpus)
    print(f"world: {args.gpus} x H100 SDXL pool (1.027 s alone, 7.16 s per batch of 8) at $2.00/h; "
          f"APIs {', '.join(f'{a.name} p50 {a.p50_ms / 1000:.0f}s fail {a.failure_rate:.0%}' for a in APIS)}")
    for kind in args.traces.split(","):
        trace = synthetic(kind, args.duration, args.rate, args.seed)
        bound = lower_bound(trace, policy, w)
        images = sum(r.n for r in trace)
        print(f"\n## trace {kind}: {len(trace)} requests, {images} images over {args.duration:.0f}s "
              f"(tiers draft/standard/premium with SLA 15/30/60 s)")
        print("| strategy | cost/image $ | total $ | API $ | SLA met | draft | standard | premium | p95 s "
              "| GPU util | local share | vs bound |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        rows = []
        for strategy in strategies(policy):
            started = time.perf_counter()
            s = simulate(trace, strategy, w, seed=args.seed).summary()
            s["sim_s"] = time.perf_counter() - started
            rows.append(s)
            tiers = s["sla_by_tier"]
            local_share = s["backend_mix"].get("local", 0) / max(1, s["requests"])
            print(f"| {s['strategy']} | {s['cost_per_image_usd']:.5f} | {s['total_cost_usd']:.2f} "
                  f"| {s['api_spend_usd']:.2f} | {s['sla_attainment']:.1%} | {tiers.get('draft', 0):.1%} "
                  f"| {tiers.get('standard', 0):.1%} | {tiers.get('premium', 0):.1%} | {s['latency_s']['p95']} "
                  f"| {s['gpu_utilisation']:.0%} | {local_share:.0%} | {s['total_cost_usd'] / bound - 1:+.1%} |")
        print(f"| lower bound (offline relaxation) | {bound / images:.5f} | {bound:.2f} | | | | | | | | | |")
        ours = rows[0]
        qualifying = [r for r in rows[1:] if r["sla_attainment"] >= 0.99]
        if qualifying:
            best = min(qualifying, key=lambda r: r["cost_per_image_usd"])
            saving = 1 - ours["cost_per_image_usd"] / best["cost_per_image_usd"]
            print(f"\nours vs best baseline at >= 99% SLA ({best['strategy']}): {saving:+.1%} cheaper per image; "
                  f"ours at {ours['sla_attainment']:.1%} SLA, {ours['total_cost_usd'] / bound - 1:+.1%} from the bound")
        else:
            print(f"\nno baseline reaches 99% SLA; ours at {ours['sla_attainment']:.1%}, "
                  f"{ours['total_cost_usd'] / bound - 1:+.1%} from the bound")
    print(f"\ncommand: .venv/bin/python benchmarks/routing_economics.py --duration {args.duration:.0f} "
          f"--rate {args.rate} --gpus {args.gpus} --seed {args.seed}")


if __name__ == "__main__":
    main()
