"""What pre-emption buys the pool, in the simulator: the shipped pool against one that pre-empts, side by side.

On a pool that pre-empts (`PoolSpec.preemptive`, `PoolModel.preemptive`), a request only the pool can serve in
time pauses a running batch of flexible work after that batch's current denoising step, instead of waiting for
the batch to end; flexible work is predicted with its whole stay stretched by the pool-only share, and the
saturation rule is off (flexible work runs between the pool-only batches). The gateway's pool does not pre-empt
yet (docs/benchmarks.md, issue 18 session 14): this measures what building it would buy.

Run: .venv/bin/python benchmarks/preemption_study.py [--pairs mixed_shapes@2,...] [--duration 1800] [--seed 1]
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import routing_economics as RE  # noqa: E402

from policies.simulate import World, simulate  # noqa: E402
from policies.traces import synthetic  # noqa: E402

PAIRS = ("bursty@1,bursty@2,bursty@3,tight_drafts@1,tight_drafts@2,tight_drafts@3,mixed_shapes@1,mixed_shapes@2,"
         "mixed_shapes@3,steady_mixed@2,steady_mixed@3,steady_tight@3,diurnal_tight@2,diurnal_tight@3,bursty_mixed@1,"
         "bursty_mixed@2,bursty_mixed@3,flash_mixed@2,flash_tight@2,flash_crowd@2,steady@3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=PAIRS, help="trace@rate, comma-separated")
    parser.add_argument("--duration", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.time()
    policy, world = RE.load_policy(), RE.world(2)
    preemptive = World(world.apis, dataclasses.replace(world.pool, preemptive=True))
    print("SLA met, total cost against the offline bound (routing_economics.lower_bound), pool utilisation; "
          "pre-emptions in brackets\n")
    print("| trace @ rate | shipped pool | pool that pre-empts | cost change |")
    print("|---|---|---|---|")
    for pair in args.pairs.split(","):
        kind, rate = pair.split("@")
        trace = synthetic(kind, args.duration, float(rate), args.seed)
        bound = RE.lower_bound(trace, policy, world)
        cells, totals = [], []
        for w in (world, preemptive):
            s = simulate(trace, policy, w, seed=args.seed).summary()
            totals.append(s["total_cost_usd"])
            cells.append(f"{s['sla_attainment']:.2%} {s['total_cost_usd'] / bound - 1:+.1%} "
                         f"{s['gpu_utilisation']:.0%}" + (f" ({s['pool_preempted']})" if w is preemptive else ""))
        print(f"| {kind} @ {rate} | {cells[0]} | {cells[1]} | {totals[1] / totals[0] - 1:+.1%} |", flush=True)
    print(f"\ncommand: .venv/bin/python benchmarks/preemption_study.py --duration {args.duration:.0f} "
          f"--seed {args.seed}" + ("" if args.pairs == PAIRS else f" --pairs {args.pairs}")
          + f"   ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
