"""Offline bounds on a trace by linear programming (HiGHS, through scipy): the most requests any router could
serve within their SLA in the simulator's world, and the least any router could pay for a given number of them.

The relaxation, per request r: it runs on the pool in time (x_r), or late on it (free, and taking no pool time), or is
sent to a set S of the APIs its tier's quality allows (y_rS); every request is served (a refusal is never
cheaper than the pool's late run, and a tier the pool may not serve must pay an API). Every choice is optimistic:

- The pool is a fluid of `gpus` GPU-seconds per second that may split and pre-empt at will: for every window
  [a, e], the images due in it that arrived in it need at most `gpus` x (e - a) seconds, each at the best
  per-image time of a batch that still fits its SLA (no batch finishes faster per image). Arrivals are rounded
  down and deadlines up to a grid of `step_s`, and only windows of a set of lengths are kept: fewer and looser
  constraints than the truth, so the bound stays a bound.
- An API meets the SLA with probability P(latency <= SLA) from its lognormal (its failures and retries can only
  lower that: a retry draws the same distribution later); a set of APIs started together meets it unless all of
  them miss; it pays every call it starts (the simulator charges a hedge's loser), at the price list's line for
  the request's size.

`max_sla_met`: the LP's most SLA-met requests (an upper bound on the expected attainment of any router).
`min_cost`: the least total cost (the reserved GPUs plus API bills) of serving at least `met` of them in time.

How loose the fluid pool makes it (`--replay`): the LP's cheapest solution at 99% (at its maximum where 99% is out of
reach), rounded to one choice per request, is replayed in the simulator, where a batch runs to its end once started
and batches form only from the jobs queued together. The pool runs the plan's jobs earliest deadline first; the
requests the plan gives up are refused. "+fallback": a planned pool job that falls behind is given back to the API
decide() ranks next, while that one can still make the SLA. A plan that cannot be executed in time says the bound
is below what any non-pre-emptive pool could reach; it does not say by how much.

Run: .venv/bin/python benchmarks/lp_bounds.py [--traces tight_drafts] [--rates 2.0] [--duration 1800] [--replay]
     .venv/bin/python benchmarks/lp_bounds.py --traces "" --trace-file held_back.jsonl --replay
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from scipy.optimize import linprog  # noqa: E402
from scipy.sparse import coo_matrix, vstack  # noqa: E402

from policies.schema import Policy  # noqa: E402
from policies.simulate import Strategy, World, simulate  # noqa: E402
from policies.traces import TraceRequest  # noqa: E402
from policies.types import RouteRequest  # noqa: E402

__all__ = ["Bounds", "bounds", "plan", "window_lengths"]


@dataclass(frozen=True, slots=True)
class Bounds:
    requests: int
    max_sla_met: float  # requests
    min_cost_usd: float | None  # at `met`; None when the LP cannot reach it
    met: float  # the attainment (requests) min_cost_usd was asked for
    gpu_usd: float

    @property
    def max_attainment(self) -> float:
        return self.max_sla_met / max(1, self.requests)


def window_lengths(horizon_steps: int, dense: int = 15) -> list[int]:
    """Every length up to `dense` grid steps, then ~25% apart up to the whole trace."""
    lengths, length = list(range(1, dense + 1)), dense
    while length < horizon_steps:
        length = max(length + 1, int(length * 1.25))
        lengths.append(min(length, horizon_steps))
    return lengths


class _Model:
    """The variables, the pool's window constraints and each request's one choice, shared by both LPs."""

    def __init__(self, trace: list[TraceRequest], policy: Policy, world: World, step_s: float):
        pool, self.trace = world.pool, trace
        apis = [a for a in world.apis if a.name in policy.backends]
        self.cost, self.hit, owner = [], [], []  # per variable: its cost, its chance of meeting the SLA, its request
        self.choice: list[tuple[str, ...]] = []  # per variable: the backends it starts (() = late on the pool)
        self.pool_vars: list[tuple[int, int, int, float]] = []  # (variable, arrival step, deadline step, seconds)
        local = policy.backends.get("local")
        for i, r in enumerate(trace):
            tier = policy.tiers[r.tier or policy.defaults.tier]
            sla_s = (r.sla_ms or tier.sla_ms or policy.defaults.sla_ms) / 1000
            route = RouteRequest(width=r.width, height=r.height, n=r.n, steps=r.steps, tier=r.tier)
            if pool is not None and local is not None:
                steps = tier.pool_steps(r.steps, pool.default_steps)
                seconds = self._pool_seconds(pool, r, steps, sla_s)
                if local.quality_at(steps) >= tier.min_quality:
                    self.cost.append(0.0), self.hit.append(0.0), owner.append(i)  # late on the pool: free
                    self.choice.append(())
                    if seconds is not None:
                        self.pool_vars.append((len(self.cost), math.floor(r.t / step_s),
                                               math.ceil((r.t + sla_s) / step_s), seconds))
                        self.cost.append(0.0), self.hit.append(1.0), owner.append(i)
                        self.choice.append(("local",))
            eligible = [a for a in apis if policy.backends[a.name].enabled and r.n <= a.max_n
                        and policy.backends[a.name].best_quality >= tier.min_quality]
            for size in range(1, len(eligible) + 1):
                for subset in itertools.combinations(eligible, size):
                    miss = math.prod(1 - a.p_within(sla_s) for a in subset)
                    usd = sum(policy.backends[a.name].price_per_image(route.megapixels, None, None) for a in subset)
                    self.cost.append(usd * r.n), self.hit.append(1 - miss), owner.append(i)
                    self.choice.append(tuple(a.name for a in subset))
        self.owner = np.array(owner)
        self.step_s = step_s
        self.gpus = pool.gpus if pool else 0
        self.gpu_usd = pool.gpus * trace[-1].t / 3600 * pool.gpu_hour_usd if pool and trace else 0.0

    @staticmethod
    def _pool_seconds(pool, r: TraceRequest, steps: int, sla_s: float) -> float | None:
        """The least pool time this request's images can take within its SLA (None: not even alone)."""
        seconds = pool.profile.seconds
        if seconds(pool.model, r.width, r.height, steps, r.n) > sla_s:
            return None
        fits = [k for k in range(r.n, pool.max_batch + 1) if seconds(pool.model, r.width, r.height, steps, k) <= sla_s]
        return min(seconds(pool.model, r.width, r.height, steps, k) / k for k in fits) * r.n

    def constraints(self):
        """(A_ub, b_ub): one choice per request, and the pool's windows (through per-deadline-class prefix sums)."""
        nvar = len(self.cost)
        rows, cols, vals, b, nrow = [], [], [], [], 0
        if self.pool_vars and self.gpus:
            # Window [a, e] holds the pool jobs with arrival >= a and deadline <= e. Grouped by their length
            # (deadline - arrival, in steps), a class's jobs in it are those arriving in [a, e - length]: a prefix
            # sum over arrivals per class makes each window a handful of terms. Prefix sums are variables
            # p[k][t] = sum of the class-k pool seconds arriving before step t (equalities, one per step).
            classes = sorted({d - a for _, a, d, _ in self.pool_vars})
            horizon = max(d for _, _, d, _ in self.pool_vars) + 1
            index = {k: c for c, k in enumerate(classes)}
            prefix0 = nvar  # p[c][t] is variable prefix0 + c * (horizon + 1) + t
            nprefix = len(classes) * (horizon + 1)
            by_cell: dict[tuple[int, int], list[tuple[int, float]]] = {}
            for var, a, d, seconds in self.pool_vars:
                by_cell.setdefault((index[d - a], a), []).append((var, seconds))
            erow = len(self.trace)  # rows 0..: request i takes exactly one choice
            eq_rows, eq_cols, eq_vals = list(self.owner), list(range(nvar)), [1.0] * nvar
            for c in range(len(classes)):
                for t in range(horizon):  # p[c][t+1] - p[c][t] - sum(seconds x) = 0
                    eq_rows += [erow, erow]
                    eq_cols += [prefix0 + c * (horizon + 1) + t + 1, prefix0 + c * (horizon + 1) + t]
                    eq_vals += [1.0, -1.0]
                    for var, seconds in by_cell.get((c, t), ()):
                        eq_rows.append(erow), eq_cols.append(var), eq_vals.append(-seconds)
                    erow += 1
                eq_rows.append(erow), eq_cols.append(prefix0 + c * (horizon + 1)), eq_vals.append(1.0)  # p[c][0]=0
                erow += 1
            for length in window_lengths(horizon):
                for a in range(0, horizon - length + 1):
                    e = a + length
                    terms = [(c, e - k) for c, k in enumerate(classes) if e - k >= a]
                    if not terms:
                        continue
                    for c, last in terms:  # p[c][last + 1] - p[c][a]
                        rows += [nrow, nrow]
                        cols += [prefix0 + c * (horizon + 1) + last + 1, prefix0 + c * (horizon + 1) + a]
                        vals += [1.0, -1.0]
                    b.append(self.gpus * length * self.step_s)
                    nrow += 1
            total = nvar + nprefix
            a_eq = coo_matrix((eq_vals, (eq_rows, eq_cols)), shape=(erow, total)).tocsr()
            a_ub = coo_matrix((vals, (rows, cols)), shape=(nrow, total)).tocsr()
            b_eq = np.zeros(erow)
            b_eq[: len(self.trace)] = 1.0
            return a_ub, np.array(b), a_eq, b_eq, total
        a_eq = coo_matrix(([1.0] * nvar, (list(self.owner), list(range(nvar)))), shape=(len(self.trace), nvar))
        return coo_matrix((0, nvar)).tocsr(), np.zeros(0), a_eq.tocsr(), np.ones(len(self.trace)), nvar


def _solve(trace: list[TraceRequest], policy: Policy, world: World, met: float | None, step_s: float, *,
           cap: bool = False):
    """Both LPs: (the model, the most requests met, the cheapest solution at `met`; None where `met` is out of
    reach, unless `cap`: then at the LP's maximum)."""
    model = _Model(trace, policy, world, step_s)
    a_ub, b_ub, a_eq, b_eq, total = model.constraints()
    hit = np.zeros(total)
    hit[: len(model.hit)] = model.hit
    cost = np.zeros(total)
    cost[: len(model.cost)] = model.cost
    box = [(0, 1)] * len(model.cost) + [(0, None)] * (total - len(model.cost))
    best = linprog(-hit, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=box, method="highs")
    if best.status != 0:
        raise RuntimeError(f"the attainment LP failed: {best.message}")
    max_met = -best.fun
    want = max_met if met is None else met
    floor = min(want, max_met - 1e-6 * max_met)  # at the maximum exactly, HiGHS may call it infeasible by a hair
    cheapest = linprog(cost, A_ub=vstack([a_ub, -hit.reshape(1, -1)]), b_ub=np.append(b_ub, -floor),
                       A_eq=a_eq, b_eq=b_eq, bounds=box, method="highs")
    return model, max_met, cheapest if cheapest.status == 0 and (cap or want <= max_met + 1e-6) else None


def bounds(trace: list[TraceRequest], policy: Policy, world: World, *, met: float | None = None,
           step_s: float = 1.0) -> Bounds:
    """Both LPs on one trace; `met` (requests within SLA) defaults to the LP's own maximum."""
    return _bounds_and_plan(trace, policy, world, met, step_s)[0]


def plan(trace: list[TraceRequest], policy: Policy, world: World, *, met: float | None = None,
         step_s: float = 1.0) -> tuple[Bounds, list[tuple[str, ...]]]:
    """The bounds, and the cheapest LP solution at `met` (at most the LP's maximum) rounded: for each request in
    time order its largest choice, the backends it starts at once (() where the LP gives it up). An offline plan
    to replay in the simulator (`Strategy.plan`), where the pool cannot pre-empt."""
    return _bounds_and_plan(trace, policy, world, met, step_s, as_plan=True)


def _bounds_and_plan(trace, policy, world, met, step_s, as_plan=False):
    trace = sorted(trace, key=lambda r: r.t)
    model, max_met, cheapest = _solve(trace, policy, world, met, step_s, cap=as_plan)
    met = max_met if met is None else min(met, max_met) if as_plan else met
    min_cost = model.gpu_usd + cheapest.fun if cheapest is not None else None
    b = Bounds(len(trace), max_met, min_cost, met, model.gpu_usd)
    if cheapest is None or not as_plan:
        return b, None
    best: dict[int, tuple[float, tuple[str, ...]]] = {}
    for var, (i, share) in enumerate(zip(model.owner, cheapest.x[: len(model.cost)], strict=True)):
        if i not in best or share > best[i][0]:
            best[i] = (share, model.choice[var])
    return b, [best[i][1] for i in range(len(trace))]


def replay(trace: list[TraceRequest], policy: Policy, world: World, planned: list[tuple[str, ...]],
           *, fallback: bool = False, seed: int = 1) -> dict:
    """The simulator's summary of `planned` run as it stands: no reservation, every tier served late rather than
    refused (the plan, not the policy, decides who is given up)."""
    data = policy.model_dump(mode="json")
    data["reserve_pool"] = False
    for tier in data["tiers"].values():
        tier["on_no_candidate"] = "best_effort"
    strategy = Strategy("the LP's plan", Policy.model_validate(data), plan=planned, plan_fallback=fallback)
    return simulate(trace, strategy, world, seed=seed).summary()


def main() -> None:
    import argparse
    import time

    import routing_economics as economics

    from policies.traces import KINDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=",".join(KINDS))
    p.add_argument("--rates", default="1.0,2.0,3.0")
    p.add_argument("--duration", type=float, default=1800)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replay", action="store_true", help="replay the LP's plan in the simulator (see above)")
    p.add_argument("--trace-file", action="append", default=[], metavar="PATH",
                   help="a JSON-lines trace to bound as well, as it is (repeatable; --traces \"\" for it alone)")
    args = p.parse_args()
    policy = economics.load_policy()
    w = economics.world(args.gpus)
    extra = (" ours: SLA (drafts), vs DP bound | the LP's plan replayed: SLA (drafts), vs DP bound, GPU util "
             "| +fallback: SLA (drafts), vs DP bound |") if args.replay else ""
    print("| rate/s | trace | requests | SLA upper bound | least cost at it | least cost at 99% | DP bound | LP s |"
          + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.replay else ""))
    rates = [(x, economics.synthetic_traces(args, float(x))) for x in args.rates.split(",")]
    for rate, named in rates + [("file", economics.trace_files(args.trace_file, policy))]:
        for kind, trace in named:
            started = time.perf_counter()
            top = bounds(trace, policy, w)
            at99, planned = plan(trace, policy, w, met=0.99 * len(trace))  # at the LP's maximum where out of reach
            spent = time.perf_counter() - started
            at99_usd = f"{at99.min_cost_usd:.2f}" if at99.met >= 0.99 * len(trace) - 1e-6 else "unreachable"
            dp = economics.lower_bound(trace, policy, w)
            row = (f"| {rate} | {kind} | {top.requests} | {top.max_attainment:.2%} | {top.min_cost_usd:.2f} "
                   f"| {at99_usd} | {dp:.2f} | {spent:.1f} |")
            if args.replay:
                ours = simulate(trace, policy, w, seed=args.seed).summary()
                cells = [_replayed(ours, dp)]
                for fallback in (False, True):
                    got = replay(trace, policy, w, planned, fallback=fallback, seed=args.seed)
                    util = "" if fallback else f", {got['gpu_utilisation']:.0%}"
                    cells.append(_replayed(got, dp) + util)
                row += " " + " | ".join(cells) + " |"
            print(row, flush=True)
    print(f"\ncommand: .venv/bin/python benchmarks/lp_bounds.py --rates {args.rates} --duration {args.duration:.0f} "
          f"--gpus {args.gpus} --seed {args.seed}{' --replay' if args.replay else ''}{economics.trace_flags(args)}")


def _replayed(summary: dict, bound_usd: float) -> str:
    drafts = summary["sla_by_tier"].get("draft")
    of_drafts = f" ({drafts:.1%})" if drafts is not None else ""
    return f"{summary['sla_attainment']:.2%}{of_drafts}, {summary['total_cost_usd'] / bound_usd - 1:+.1%}"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
