"""Times decide() with 8 backends and 20 rules: p50/p99 per call.

Run: .venv/bin/python benchmarks/decide.py
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies import decide  # noqa: E402
from policies.profile import ThroughputProfile  # noqa: E402
from policies.schema import Policy  # noqa: E402
from policies.types import (  # noqa: E402
    BackendKind,
    BackendView,
    Health,
    LatencyModel,
    PoolModel,
    RouteRequest,
    SizeSupport,
    Snapshot,
)

PROFILE = ThroughputProfile({("local-m", 1024, 1024, 30): {1: 1.0, 8: 4.8}})


def world() -> tuple[Policy, Snapshot]:
    names = ["local", "seedream", "gemini", "reve", "bria", "api5", "api6", "api7"]
    policy = Policy.model_validate({
        "tiers": {"draft": {}, "standard": {"min_quality": 0.5}, "premium": {"min_quality": 0.8}},
        "backends": {n: {"quality": 0.5 + i * 0.05, "price_per_image_usd": None if n == "local" else 0.01 * i}
                     for i, n in enumerate(names)},
        "rules": [{"name": f"r{i}", "match": {"tenants": [f"tenant{i}"]}, "deny": [names[i % 8]]}
                  for i in range(19)] + [{"name": "catch-all", "match": {}, "deny": ["api7"]}],
    })
    views = []
    for i, n in enumerate(names):
        local = n == "local"
        views.append(BackendView(
            name=n, kind=BackendKind.LOCAL if local else BackendKind.API, health=Health.OK,
            models=(f"{n}-m",), sizes=SizeSupport(), max_n=10, default_steps=30,
            latency=LatencyModel(p50_ms=1000 + i * 500, p95_ms=3000 + i * 1000),
            pool=PoolModel(PROFILE, "local-m", gpu_hour_usd=2.0) if local else None))
    return policy, Snapshot(tuple(views))


def main() -> None:
    policy, snapshot = world()
    request = RouteRequest(width=1024, height=1024, tenant="tenant-none", tier="standard", sla_ms=20_000)
    for _ in range(2_000):
        decide(request, policy, snapshot)
    gc.collect()
    gc.freeze()  # as the gateway does after start-up (gateway/app.py): collections skip long-lived objects
    samples = []
    for _ in range(20_000):
        t = time.perf_counter_ns()
        decide(request, policy, snapshot)
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    print("decide(): 8 backends, 20 rules (no rule matches: every rule is checked)")
    print(f"  p50 {statistics.median(samples):.1f} us   p99 {samples[int(len(samples) * 0.99)]:.1f} us   "
          f"mean {statistics.fmean(samples):.1f} us   n={len(samples)}")
    print("  command: .venv/bin/python benchmarks/decide.py")


if __name__ == "__main__":
    main()
