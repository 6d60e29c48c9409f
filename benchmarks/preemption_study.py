"""What pre-emption would buy the pool: a study in the simulator, of a pool the gateway does not have.

Sessions 8-13 of issue 18 left one lever untried: a request only the pool can serve in time (a 5 s draft) pausing
a running batch of flexible work at its next denoising step, instead of waiting for the batch to end (the
reason for the shipped batch cap and saturation rule, policies.reservation). Here the simulator's pool gets it:

- two queues: pool-only requests (decided again against the pool-only work alone when the whole pool would make
  them late) and the rest; a pool-only batch starts on an idle GPU, else pre-empts a GPU running flexible work
  after that batch's current step (its seconds / steps), and the paused batch ends later by the pre-empting
  batch's run; a pool-only batch is never pre-empted;
- variants: the shipped batch cap kept or dropped; the saturation rule dropped; and a price gate (flexible work
  goes to the pool only if it saves at least the value per GPU-second at which recent demand, pool-only work
  first, fills the pool).

The gateway's pool cannot pre-empt; nothing here is shipped. docs/benchmarks.md has the table and what it says.

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

from policies import simulate as S  # noqa: E402
from policies.batching import ArrivalRate, QueuedJob, SLABatcher  # noqa: E402
from policies.decide import decide  # noqa: E402
from policies.reservation import pool_arrival  # noqa: E402
from policies.traces import synthetic  # noqa: E402
from policies.types import PoolModel, RouteRequest, Snapshot  # noqa: E402

PAIRS = ("bursty@1,bursty@2,bursty@3,tight_drafts@1,tight_drafts@2,tight_drafts@3,mixed_shapes@1,mixed_shapes@2,"
         "mixed_shapes@3,steady_mixed@2,steady_mixed@3,steady_tight@3,diurnal_tight@2,diurnal_tight@3,bursty_mixed@1,"
         "bursty_mixed@2,bursty_mixed@3,flash_mixed@2,flash_tight@2,flash_crowd@2,steady@3")
VARIANTS = {  # name -> class attributes of the pre-empting simulator (None: the shipped simulator)
    "shipped": None,
    "pre-empt": {"cap": True},
    "pre-empt, run stretched": {"cap": True, "stretch_run": True},
    "pre-empt, run stretched, no cap": {"stretch_run": True},
    "no pre-emption, run stretched (control)": {"cap": True, "stretch_run": True, "preempt": False,
                                                "saturation": True},
    "pre-empt, price gate": {"cap": True, "price_fill": 1.0},
}


@dataclasses.dataclass(frozen=True, slots=True)
class PreemptiblePoolModel(PoolModel):
    """A flexible job on a pool whose pool-only work pre-empts it: its whole stay (wait and run) stretches by
    1 / (1 - the pool-only share), not its wait alone (PoolModel.reserved_delay_s)."""

    def completion_s(self, request, steps, sla_s=None, due_s=None) -> float:
        share = min(self.reserved_share, 0.9)
        return PoolModel.completion_s(self, request, steps, sla_s, due_s) / (1 - share)

    def reserved_delay_s(self, sla_s) -> float:
        return 0.0


class PSim(S._Sim):
    """The simulator with a pool whose pool-only batches pre-empt flexible ones (the module doc)."""

    cap = False  # keep the shipped batch cap for flexible work (no batch longer than a draft can wait)
    saturation = False  # keep the shipped saturation rule
    preempt = True  # off: pool-only batches only go first on a GPU that comes free (the control)
    stretch_run = False  # predict flexible work with its run stretched too (PreemptiblePoolModel)
    price_fill = None  # the price gate: flexible work goes to the pool only while demand this dense fills it

    def price(self) -> float:
        """The least USD per GPU-second a flexible request must save to take the pool: walking recent demand
        (pool-only work, SLA under 10 s, first; then the rest by value), the value at which it fills `price_fill`
        of each worker's time."""
        table = self.demand.table(self.now, self.world.pool.gpus)
        filled = 0.0
        for value, _sla, minute_share, _burst in sorted(table, key=lambda e: (e[1] >= 10, -e[0])):
            filled += minute_share
            if filled >= self.price_fill:
                return value
        return 0.0

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        pool = self.world.pool
        self.urgent = SLABatcher(lambda: pool.profile, max_batch=pool.max_batch, max_wait_s=pool.max_wait_s,
                                 clock=lambda: self.now, arrivals=ArrivalRate())
        if not self.cap:
            self.batcher.max_batch_s = None
        self.flex = [None] * pool.gpus  # per GPU: (flexible batch, when it ends, one step's seconds) or None
        self.urg_end = [0.0] * pool.gpus  # per GPU: when its pool-only batch ends
        self.ends = {}  # id(batch) -> when it ends now (a pre-emption pushes a flexible one back)
        self.urgent_ids = set()  # id(outcome) of the pool-only requests
        self.preempted = 0

    def _free_at(self, i):
        f = self.flex[i]
        return max(self.urg_end[i], f[1] if f else 0.0)

    def snapshot(self, urgent_view=False):
        snap = super().snapshot()
        views = []
        for v in snap.backends:
            if v.pool is None:
                views.append(v)
                continue
            m = v.pool
            ch = {}
            if not self.cap:
                ch["batch_cap_s"] = None
            if not self.saturation:
                ch["sustained_share"] = 0.0
            if urgent_view:
                pool = self.world.pool
                # ahead of an urgent job: urgent work running, else the step boundary of a flexible batch
                run = []
                for i in range(pool.gpus):
                    if self.urg_end[i] > self.now:
                        run.append(self.urg_end[i] - self.now)
                    elif self.flex[i] and self.flex[i][1] > self.now:
                        run.append(self.flex[i][2])
                    else:
                        run.append(0.0)
                running = sum(run)
                q = self.urgent.points(self.now, running, pool.gpus)
                idle = any(r == 0 for r in run)
                ch.update(queue=q, running_s=running, work_ahead_s=q[-1].work_s if q else running,
                          has_headroom=idle and len(self.urgent) == 0)
            model = dataclasses.replace(m, **ch)
            if self.stretch_run and not urgent_view:
                model = PreemptiblePoolModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
            views.append(dataclasses.replace(v, pool=model))
        return Snapshot(tuple(views))

    def arrive(self, req):
        route = RouteRequest(width=req.width, height=req.height, n=req.n, steps=req.steps, tenant=req.tenant,
                             tier=req.tier, sla_ms=req.sla_ms)
        tier = req.tier or self.policy.defaults.tier
        tier_sla = self.policy.tiers[tier].sla_ms if tier in self.policy.tiers else None
        outcome = S.Outcome(req, tier, req.sla_ms or tier_sla or self.policy.defaults.sla_ms)
        self.outcomes.append(outcome)
        snapshot = self.snapshot()
        decision = decide(route, self.policy, snapshot)
        cands = list(decision.candidates)
        pool_only = cands and all(c.backend == "local" for c in cands)
        if (decision.at_risk or not cands or pool_only) and decision.pool_demand is not None:
            snap2 = self.snapshot(urgent_view=True)
            d2 = decide(route, self.policy, snap2)
            c2 = list(d2.candidates)
            if c2 and c2[0].backend == "local" and (not d2.at_risk or decision.at_risk or not cands):
                decision, snapshot, cands = d2, snap2, c2
                self.urgent_ids.add(id(outcome))
        outcome.serve_within_ms = decision.serve_within_ms
        if self.policy.reserve_pool and (arrival := pool_arrival(decision, snapshot)) is not None:
            arrival.record(self.now, self.inflexible, self.demand)
        if id(outcome) in self.urgent_ids:
            self.attempt(outcome, cands[:1] + [c for c in cands[1:] if c.backend != "local"])
            return
        if self.price_fill is not None and len(cands) > 1 and cands[0].backend == "local" and \
                decision.pool_demand is not None and decision.pool_demand[2] < self.price():
            cands = cands[1:]
        second = decision.hedge_partner(cands[0], cands[1:]) if cands else None
        if second is not None:
            first = cands[0]
            outcome.race = S._Race(partner=second, rest=cands[2:], running=[first])
            self.push(self.now + first.predicted_latency_ms / 1000, "hedge", outcome)
            cands = [first]
        self.attempt(outcome, cands)

    def attempt(self, outcome, candidates, tries=1):
        if candidates and candidates[0].backend == "local" and id(outcome) in self.urgent_ids:
            pool = self.world.pool
            c = candidates[0]
            key = (pool.model, outcome.request.width, outcome.request.height, c.steps, 5.0)
            job = QueuedJob(key, outcome.request.n, outcome.give_up_at, self.now, (outcome, candidates[1:], c))
            self.urgent.put(job)
            self.pump()
            return
        super().attempt(outcome, candidates, tries)

    def running_s(self):
        return sum(max(0.0, self._free_at(i) - self.now) for i in range(len(self.flex)))

    def _launch(self, batch, gpu, urgent):
        pool = self.world.pool
        seconds = pool.profile.seconds(*batch.key[:4], batch.slots)
        start = self.now
        if urgent:
            f = self.flex[gpu]
            if f and f[1] > self.now:  # pre-empt at the next step boundary
                start = self.now + f[2]
                b, end, st = f
                self.flex[gpu] = (b, end + seconds, st)
                self.ends[id(b)] = end + seconds
                self.push(end + seconds, "batch_done", (b, seconds))
                for job in b.jobs:
                    self.running_until[id(job)] = end + seconds
                self.preempted += 1
            self.urg_end[gpu] = start + seconds
        else:
            self.flex[gpu] = (batch, start + seconds, seconds / batch.key[3])
        end = start + seconds
        self.ends[id(batch)] = end
        self.gpu_free_at[gpu] = self._free_at(gpu)
        self.busy_s += seconds
        m = int(self.now // 60)
        self.busy_by_minute[m] = self.busy_by_minute.get(m, 0.0) + seconds
        self.occupancy = 0.8 * self.occupancy + 0.2 * batch.slots
        for job in batch.jobs:
            self.running_until[id(job)] = end
        self.push(end, "batch_done", (batch, seconds))

    def pump(self):
        pool = self.world.pool
        for job in self.batcher.settle(self.now, self.running_s(), pool.gpus):
            self.released += 1
            self.fallback(*job.payload)
        wakes = []
        # urgent first: any GPU not running urgent work (idle first, else the flexible batch with most slack)
        while True:
            cands = [i for i in range(pool.gpus) if self.urg_end[i] <= self.now
                     and (self.preempt or self._free_at(i) <= self.now)]
            if not cands:
                break
            cands.sort(key=lambda i: (self._free_at(i) > self.now, -(self.flex[i][1] if self.flex[i] else 0)))
            i = cands[0]
            idle_since = self._free_at(i) if self._free_at(i) <= self.now else self.now
            batch, wake = self.urgent.next_batch(idle_since)
            if batch is None:
                if wake is not None:
                    wakes.append(wake)
                break
            self._launch(batch, i, True)
        while True:
            free = [i for i in range(pool.gpus) if self._free_at(i) <= self.now]
            if not free:
                break
            free_since = min(self._free_at(i) for i in free)
            batch, wake = self.batcher.next_batch(free_since)
            if batch is None:
                if wake is not None:
                    wakes.append(wake)
                break
            self._launch(batch, free[0], False)
        settle = self.batcher.next_settle()
        if settle is not None:
            wakes.append(settle)
        if wakes:
            wake = min(wakes)
            if self.wake_at is None or wake < self.wake_at or self.wake_at <= self.now:
                self.wake_at = wake
                self.push(max(wake, self.now), "wake", None)

    def batch_done(self, batch, seconds) -> None:
        if abs(self.ends.get(id(batch), -1) - self.now) > 1e-9:
            return  # pushed back by a pre-emption: its event at the new end counts
        del self.ends[id(batch)]
        self.flex = [None if f is not None and f[0] is batch else f for f in self.flex]
        super().batch_done(batch, self.world.pool.profile.seconds(*batch.key[:4], batch.slots))

def run(kind: str, rate: float, duration: float, seed: int, variant: dict | None) -> tuple[float, float, int]:
    policy, world = RE.load_policy(), RE.world(2)
    trace = synthetic(kind, duration, rate, seed)
    bound = RE.lower_bound(trace, policy, world)
    if variant is None:
        result, preempted = S.simulate(trace, policy, world, seed=seed), 0
    else:
        sim = type("Variant", (PSim,), variant)(sorted(trace, key=lambda r: r.t), S.Strategy("p", policy), world, seed)
        result, preempted = sim.run(None), sim.preempted
    summary = result.summary()
    return summary["sla_attainment"], summary["total_cost_usd"] / bound - 1, preempted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=PAIRS, help="trace@rate, comma-separated")
    parser.add_argument("--duration", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.time()
    print("SLA met, then total cost against the offline bound (benchmarks/routing_economics.py lower_bound); "
          "pre-emptions in brackets\n")
    print("| trace @ rate | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for pair in args.pairs.split(","):
        kind, rate = pair.split("@")
        cells = []
        for variant in VARIANTS.values():
            sla, vs_bound, preempted = run(kind, float(rate), args.duration, args.seed, variant)
            cells.append(f"{sla:.2%} {vs_bound:+.1%}" + (f" ({preempted})" if variant is not None else ""))
        print(f"| {kind} @ {rate} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ncommand: .venv/bin/python benchmarks/preemption_study.py --duration {args.duration:.0f} "
          f"--seed {args.seed}" + ("" if args.pairs == PAIRS else f" --pairs {args.pairs}")
          + f"   ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
