"""Discrete-event simulation of the gateway on a request trace, routed by the real `decide()`.

The local pool is the real batching rule (`policies.batching.SLABatcher`) over
`gpus` workers timed by the throughput profile; each API is a lognormal latency
(fitted to p50/p95) with a failure rate, and a failed attempt falls back to the
next candidate as the dispatcher does. Snapshots are rebuilt from the simulated
state at every arrival. Pure: no I/O, no wall clock; deterministic for a seed.

Cost: what the APIs charge, plus the reserved GPUs for the whole horizon (paid
busy or idle; this is the local pool's real cost).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .batching import ArrivalRate, QueuedJob, SLABatcher
from .decide import decide, start_within_ms
from .holding import hold_for_s
from .profile import ThroughputProfile
from .reservation import InflexibleArrivals, PoolDemand, pool_arrival, pool_job_hedge_pays
from .schema import Policy
from .traces import TraceRequest
from .types import (
    BackendKind,
    BackendView,
    Candidate,
    Health,
    LatencyModel,
    PoolModel,
    RouteRequest,
    SizeSupport,
    Snapshot,
)

__all__ = ["ApiModel", "PoolSpec", "SimResult", "Strategy", "World", "simulate", "with_rule"]


@dataclass(frozen=True, slots=True)
class ApiModel:
    name: str
    p50_ms: float
    p95_ms: float
    failure_rate: float = 0.0
    max_n: int = 10

    @property
    def sigma(self) -> float:  # of the lognormal through p50 and p95
        return math.log(max(self.p95_ms, self.p50_ms) / self.p50_ms) / 1.645

    def sample_s(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.p50_ms), self.sigma) / 1000

    def p_within(self, seconds: float) -> float:
        """The chance one call answers within `seconds` (failures aside)."""
        if self.sigma == 0:
            return float(self.p50_ms / 1000 <= seconds)
        return 0.5 * (1 + math.erf(math.log(seconds * 1000 / self.p50_ms) / (self.sigma * math.sqrt(2))))


@dataclass(frozen=True, slots=True)
class PoolSpec:
    profile: ThroughputProfile
    model: str
    gpus: int = 1
    max_batch: int = 8
    max_wait_s: float = 0.1
    gpu_hour_usd: float = 2.0
    default_steps: int = 30
    fixed_p50_ms: float = 50
    fixed_p95_ms: float = 250
    # A batch of pool-only work (Candidate.preempts) pauses a running flexible batch after its current step
    # (its seconds / steps); the paused batch ends later by the pre-empting batch's run (PoolModel.preemptive).
    preemptive: bool = False


@dataclass(frozen=True, slots=True)
class World:
    apis: tuple[ApiModel, ...]
    pool: PoolSpec | None = None


@dataclass(frozen=True, slots=True)
class Strategy:
    """How to route: a policy for `decide()`, optionally a per-request tweak (e.g. a random split)."""

    name: str
    policy: Policy
    tweak: Callable[[RouteRequest, random.Random], RouteRequest] | None = None
    queue_blind: bool = False  # routes as if the pool never had work queued (as gateways without a queue model)
    recent_latency: bool = False  # predicts each backend by its recent observed latency (EWMA), nothing else
    late_binding: bool = True  # the pool may give back a tentative job (policies.batching); off: bound at arrival
    # An offline plan replayed instead of decide()'s order: for each request of the trace in time order, the backends
    # started at once (() refuses it). Each is still predicted by decide() (named as the request's backend).
    plan: Sequence[tuple[str, ...]] | None = None
    plan_fallback: bool = False  # a planned pool job may still be given back to decide()'s other candidates


@dataclass(slots=True)
class Outcome:
    request: TraceRequest
    tier: str
    sla_ms: int
    backend: str | None = None
    done_at: float | None = None
    cost_usd: float = 0.0
    attempts: int = 0
    race: _Race | None = None  # a hedged pair in flight
    serve_within_ms: float | None = None  # a best-effort request's allowance past its SLA (Decision.serve_within_ms)

    @property
    def give_up_at(self) -> float:
        return self.request.t + (self.serve_within_ms or self.sla_ms) / 1000

    @property
    def latency_s(self) -> float | None:
        return None if self.done_at is None else self.done_at - self.request.t

    @property
    def sla_met(self) -> bool:
        return self.latency_s is not None and self.latency_s * 1000 <= self.sla_ms


@dataclass(slots=True)
class _Race:
    """A hedged pair, as the dispatcher runs one: the second starts when the first passes its predicted
    latency (or fails); the first success wins and a loser still running is charged its predicted cost."""

    partner: Candidate | None  # the second, not started yet
    rest: list  # the candidates after the pair, tried if both fail
    running: list = field(default_factory=list)  # candidates in flight
    local_job: QueuedJob | None = None  # the pool's place, withdrawn if an API wins first


@dataclass(slots=True)
class SimResult:
    strategy: str
    outcomes: list[Outcome]
    horizon_s: float
    api_spend_usd: float
    gpu_cost_usd: float
    gpu_busy_s: float
    gpus: int
    timeline: list[dict] = field(default_factory=list)
    released: int = 0  # pool jobs given back to their next candidate (late binding)
    hedges: int = 0  # second calls started by hedging
    jobs_held: int = 0  # times an async job waited for idle pool capacity
    preempted: int = 0  # flexible batches paused for a pool-only one (PoolSpec.preemptive)

    @property
    def images(self) -> int:
        return sum(o.request.n for o in self.outcomes if o.done_at is not None)

    def summary(self) -> dict:
        served = [o for o in self.outcomes if o.done_at is not None]
        latencies = sorted(o.latency_s for o in served)
        tiers = sorted({o.tier for o in self.outcomes})
        total = self.api_spend_usd + self.gpu_cost_usd
        return {
            "strategy": self.strategy, "requests": len(self.outcomes), "served": len(served),
            "refused_or_failed": len(self.outcomes) - len(served), "images": self.images,
            "api_spend_usd": round(self.api_spend_usd, 4), "gpu_cost_usd": round(self.gpu_cost_usd, 4),
            "total_cost_usd": round(total, 4), "cost_per_image_usd": total / self.images if self.images else None,
            # What counts: refused and late requests bought nothing the client wanted.
            "sla_met_images": (met := sum(o.request.n for o in self.outcomes if o.sla_met)),
            "cost_per_sla_met_image_usd": total / met if met else None,
            "sla_attainment": sum(o.sla_met for o in self.outcomes) / max(1, len(self.outcomes)),
            "sla_by_tier": {t: sum(o.sla_met for o in self.outcomes if o.tier == t)
                            / max(1, sum(1 for o in self.outcomes if o.tier == t)) for t in tiers},
            "backend_mix": dict(Counter(o.backend or "none" for o in self.outcomes)),
            "latency_s": {q: _pct(latencies, p) for q, p in (("p50", .5), ("p95", .95), ("p99", .99))},
            "gpu_utilisation": self.gpu_busy_s / max(1e-9, self.gpus * self.horizon_s),
            "pool_released": self.released, "hedges_started": self.hedges, "jobs_held": self.jobs_held,
            "pool_preempted": self.preempted,
        }


def _pct(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


class _Sim:
    def __init__(self, trace, strategy: Strategy, world: World, seed: int):
        self.trace, self.strategy, self.world = trace, strategy, world
        self.order = {id(r): i for i, r in enumerate(trace)}  # a request's place in the trace (Strategy.plan)
        self.policy = strategy.policy
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list = []
        self.seq = 0
        self.apis = {a.name: a for a in world.apis}
        pool = world.pool
        # As the gateway's pool: a lone job waits for company only when the arrivals say some is coming.
        self.inflexible = InflexibleArrivals()  # requests only the pool could serve (trunk reservation)
        self.demand = PoolDemand()  # every request the pool could serve, by what it saves per GPU-second
        self.batcher = SLABatcher(lambda: pool.profile, max_batch=pool.max_batch, max_wait_s=pool.max_wait_s,
                                  clock=lambda: self.now, arrivals=ArrivalRate(),
                                  max_batch_s=lambda: self.inflexible.max_batch_s(self.now)) if pool else None
        self.gpu_free_at = [0.0] * (pool.gpus if pool else 0)
        # A pool that pre-empts (PoolSpec.preemptive): pool-only work queues apart and goes first, and per GPU the
        # flexible batch it may pause, (batch, its end, one step's seconds), and when its pool-only batch ends.
        self.pool_only = SLABatcher(lambda: pool.profile, max_batch=pool.max_batch, max_wait_s=pool.max_wait_s,
                                    clock=lambda: self.now, arrivals=ArrivalRate()) \
            if pool and pool.preemptive else None
        self.flexible: list[tuple | None] = [None] * len(self.gpu_free_at)
        self.pool_only_until = [0.0] * len(self.gpu_free_at)
        self.ends: dict[int, float] = {}  # id(batch) -> when it ends now (a pre-emption pushes a flexible one back)
        self.preempted = 0
        self.running_until: dict[int, float] = {}  # id(job) -> when its running batch ends
        self.occupancy = 1.0
        self.busy_s = 0.0
        self.busy_by_minute: dict[int, float] = {}  # GPU-seconds started in each minute (utilisation over time)
        self.api_spend = 0.0
        self.wake_at: float | None = None
        self.outcomes: list[Outcome] = []
        self.recent: dict[str, float] = {}  # backend -> EWMA of observed latency, ms
        self.released = 0
        self.hedges = 0
        self.held = 0  # times an async job was held for idle pool capacity

    def push(self, at: float, kind: str, data) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    # --- the world as decide() sees it ---------------------------------------------------

    def _latency(self, name: str, p50: float, p95: float) -> LatencyModel:
        if self.strategy.recent_latency and name in self.recent:
            return LatencyModel(self.recent[name], self.recent[name])
        return LatencyModel(p50, p95)

    def observe(self, backend: str, outcome: Outcome) -> None:
        ms = outcome.latency_s * 1000
        self.recent[backend] = ms if backend not in self.recent else 0.8 * self.recent[backend] + 0.2 * ms

    def running_s(self) -> float:
        return sum(max(0.0, t - self.now) for t in self.gpu_free_at)

    def snapshot(self) -> Snapshot:
        views = [BackendView(name=a.name, kind=BackendKind.API, health=Health.OK, models=(a.name,),
                             sizes=SizeSupport(), max_n=a.max_n, default_steps=30,
                             latency=self._latency(a.name, a.p50_ms, a.p95_ms)) for a in self.world.apis]
        pool = self.world.pool
        if pool is not None:
            running = self.running_s()
            idle = any(t <= self.now for t in self.gpu_free_at)
            queue = None if self.strategy.queue_blind else self.batcher.points(self.now, running, pool.gpus)
            model = PoolModel(pool.profile, pool.model, pool.gpu_hour_usd, workers=pool.gpus,
                              work_ahead_s=0.0 if queue is None else queue[-1].work_s if queue else running,
                              typical_batch=self.occupancy, has_headroom=idle and len(self.batcher) == 0,
                              max_wait_s=pool.max_wait_s if self.batcher.arrivals.expects_any(pool.max_wait_s)
                              else 0.0, running_s=0.0 if queue is None else running, queue=queue,
                              reserved_share=self.inflexible.share(self.now, pool.gpus),
                              sustained_share=self.inflexible.sustained_share(self.now, pool.gpus),
                              batch_cap_s=self.inflexible.max_batch_s(self.now),
                              demand=self.demand.table(self.now, pool.gpus), **self._pre_emption())
            views.append(BackendView(name="local", kind=BackendKind.LOCAL, health=Health.OK, models=(pool.model,),
                                     sizes=SizeSupport(max_side=2048, multiple_of=8), max_n=10,
                                     default_steps=pool.default_steps,
                                     latency=self._latency("local", pool.fixed_p50_ms, pool.fixed_p95_ms),
                                     pool=None if self.strategy.recent_latency and "local" in self.recent else model))
        return Snapshot(tuple(views))

    def _pre_emption(self) -> dict:
        """PoolModel's pre-emption fields: what runs ahead of a pool-only job on each GPU (its pool-only batch,
        else a step of the flexible batch it would pause) and the pool-only queue."""
        if self.pool_only is None:
            return {}
        ahead = 0.0
        for gpu, until in enumerate(self.pool_only_until):
            flexible = self.flexible[gpu]
            if until > self.now:
                ahead += until - self.now
            elif flexible is not None and flexible[1] > self.now:
                ahead += flexible[2]
        return {"preemptive": True, "pool_only_running_s": ahead,
                "pool_only_queue": self.pool_only.points(self.now, ahead, len(self.gpu_free_at))}

    # --- events -------------------------------------------------------------------------

    def _hold_s(self, req: TraceRequest, route: RouteRequest) -> float:
        """An async job waits for idle pool capacity as the gateway's job runner makes it wait."""
        pool = self.world.pool
        if not req.job or pool is None:
            return 0.0
        decision = decide(route, self.policy, self.snapshot())
        if not any(c.backend == "local" for c in decision.candidates):
            return 0.0  # a job the pool cannot take does not wait for it
        idle = any(t <= self.now for t in self.gpu_free_at) and len(self.batcher) == 0
        return hold_for_s(decision.sla_ms / 1000 - (self.now - req.t), idle, decision, self.policy.jobs)

    def arrive(self, req: TraceRequest) -> None:
        route = RouteRequest(width=req.width, height=req.height, n=req.n, steps=req.steps, tenant=req.tenant,
                             tier=req.tier, sla_ms=req.sla_ms)
        hold = self._hold_s(req, route)
        if hold > 0:
            self.held += 1
            self.push(self.now + hold, "arrive", req)  # decided again then; its latency counts from req.t
            return
        tier = req.tier or self.policy.defaults.tier
        tier_sla = self.policy.tiers[tier].sla_ms if tier in self.policy.tiers else None
        outcome = Outcome(req, tier, req.sla_ms or tier_sla or self.policy.defaults.sla_ms)
        self.outcomes.append(outcome)
        if self.strategy.tweak is not None:
            route = self.strategy.tweak(route, self.rng)
        if self.strategy.plan is not None:
            self.start_planned(outcome, route, self.strategy.plan[self.order[id(req)]])
            return
        snapshot = self.snapshot()
        decision = decide(route, self.policy, snapshot)
        outcome.serve_within_ms = decision.serve_within_ms
        candidates = list(decision.candidates)
        if self.policy.reserve_pool and (arrival := pool_arrival(decision, snapshot)) is not None:
            arrival.record(self.now, self.inflexible, self.demand)  # as the gateway's pool does
        second = decision.hedge_partner(candidates[0], candidates[1:]) if candidates else None
        if second is not None:
            first = candidates[0]
            outcome.race = _Race(partner=second, rest=candidates[2:], running=[first])
            self.push(self.now + first.predicted_latency_ms / 1000, "hedge", outcome)
            candidates = [first]
        self.attempt(outcome, candidates)

    def start_planned(self, outcome: Outcome, route: RouteRequest, backends: tuple[str, ...]) -> None:
        """An offline plan's choice for this request: its backends started at once, none (refused) when it
        gives the request up. With `plan_fallback`, a lone pool job keeps decide()'s first other candidate."""
        snapshot, candidates = self.snapshot(), []
        for name in backends:
            decision = decide(dataclasses.replace(route, backend=name), self.policy, snapshot)
            candidates += [c for c in decision.candidates if c.backend == name]
            if name == "local":
                outcome.serve_within_ms = decision.serve_within_ms
        if len(candidates) > 1:  # started together: the first success wins, the others are charged
            outcome.race = _Race(partner=None, rest=[], running=list(candidates))
        rest = []
        if self.strategy.plan_fallback and [c.backend for c in candidates] == ["local"]:
            rest = [c for c in decide(route, self.policy, snapshot).candidates if c.backend != "local"][:1]
            if rest:  # due by its SLA now, and given back while the fallback can still make it
                candidates[0].start_within_ms = start_within_ms(outcome.sla_ms, snapshot.get(rest[0].backend))
                outcome.serve_within_ms = None
        for candidate in candidates or [None]:
            self.attempt(outcome, [candidate, *rest] if candidate else [])

    def start_partner(self, outcome: Outcome) -> None:
        race = outcome.race
        if race is None or race.partner is None or outcome.done_at is not None:
            return
        if race.local_job is not None and not self.pool_late(race.local_job, outcome):
            return  # the pool predicts it on time: no second call unless it fails (see fallback)
        partner, race.partner = race.partner, None
        race.running.append(partner)
        self.hedges += 1
        self.attempt(outcome, [partner])

    def pool_late(self, job: QueuedJob, outcome: Outcome) -> bool:
        """As the gateway's pool answers the dispatcher at hedge time (LocalPool.hedge_pays)."""
        gpus = self.world.pool.gpus
        return pool_job_hedge_pays(self.batcher, job, self.now, outcome.request.t + outcome.sla_ms / 1000,
                                   running_until=self.running_until.get(id(job)), running_s=self.running_s(),
                                   workers=gpus, share=self.inflexible.share(self.now, gpus))

    def fallback(self, outcome: Outcome, rest: list, failed) -> None:
        """After `failed` gave up: its racing partner, else the next candidate."""
        race = outcome.race
        if race is None or rest:
            self.attempt(outcome, rest)
            return
        if failed in race.running:
            race.running.remove(failed)
        if race.partner is not None:
            self.start_partner(outcome)  # the first failed before the hedge was due: start it now
        elif not race.running and outcome.done_at is None:
            outcome.race = None
            self.attempt(outcome, race.rest)

    def finish(self, outcome: Outcome, backend: str, cost_usd: float, winner) -> bool:
        """Record the first success; False for a hedge that lost (already charged when the winner came)."""
        if outcome.done_at is not None:
            return False
        outcome.backend, outcome.done_at, outcome.cost_usd = backend, self.now, cost_usd
        race, outcome.race = outcome.race, None
        if race is not None:
            for loser in race.running:
                if loser is winner:
                    continue
                if loser.backend == "local":
                    if race.local_job is not None:  # queued: withdrawn; running: the GPU time is spent
                        for queue in (self.batcher, self.pool_only):
                            if queue is not None:
                                queue.remove(race.local_job)
                else:
                    self.api_spend += loser.predicted_cost_usd  # cancelled mid-flight, may still be billed
                    outcome.cost_usd += loser.predicted_cost_usd
        self.observe(backend, outcome)
        return True

    def attempt(self, outcome: Outcome, candidates: list, tries: int = 1) -> None:
        if not candidates:
            return  # refused: no images, SLA missed
        candidate, rest = candidates[0], candidates[1:]
        outcome.attempts += 1
        if candidate.backend == "local":
            pool = self.world.pool
            key = (pool.model, outcome.request.width, outcome.request.height, candidate.steps, 5.0)
            queue = self.pool_only if candidate.preempts and self.pool_only is not None else self.batcher
            start_by = None
            if candidate.start_within_ms is not None and self.binds_late and queue is self.batcher:
                start_by = outcome.request.t + candidate.start_within_ms / 1000
            job = QueuedJob(key, outcome.request.n, outcome.give_up_at, self.now,
                            (outcome, rest, candidate), start_by=start_by)
            if outcome.race is not None:
                outcome.race.local_job = job
            queue.put(job)
            self.pump()
            return
        api = self.apis[candidate.backend]
        took = api.sample_s(self.rng)
        if self.rng.random() < api.failure_rate:
            # As the dispatcher: a failed call is retried on the same backend (after a backoff) while the
            # policy's attempts and the deadline allow, then the next candidate is tried.
            failed_at = self.now + took * 0.5
            dispatch = self.policy.dispatch
            backoff = dispatch.backoff_initial_ms / 1000 * self.rng.random() * 2
            if tries < dispatch.max_attempts_per_backend and \
                    failed_at + backoff < outcome.give_up_at:
                self.push(failed_at + backoff, "retry", (outcome, candidates, tries + 1))
            else:
                self.push(failed_at, "fallback", (outcome, rest, candidate))
        else:
            self.push(self.now + took, "api_done", (outcome, candidate))

    @property
    def binds_late(self) -> bool:
        # Strategies that do not look at the queue cannot give a job back when it falls behind.
        return self.strategy.late_binding and not (self.strategy.queue_blind or self.strategy.recent_latency)

    def pump(self) -> None:
        pool = self.world.pool
        for job in self.batcher.settle(self.now, self.running_s(), pool.gpus):
            self.released += 1
            self.fallback(*job.payload)  # given back: its next candidate, while that can still make it
        wakes = [] if self.pool_only is None else self._launch_pool_only()
        while True:
            free = [i for i, t in enumerate(self.gpu_free_at) if t <= self.now]
            free_since = min(self.gpu_free_at[i] for i in free) if free else None
            batch, wake = self.batcher.next_batch(free_since) if free else (None, None)
            if batch is None:
                break
            self._launch(batch, free[0])
        wakes += [t for t in (wake, self.batcher.next_settle()) if t is not None]
        if wakes and (self.wake_at is None or min(wakes) < self.wake_at or self.wake_at <= self.now):
            self.wake_at = min(wakes)
            self.push(max(self.wake_at, self.now), "wake", None)

    def _launch_pool_only(self) -> list[float]:
        """Pool-only batches on every GPU not running one: an idle GPU first, else the flexible batch with the most
        slack, which they pause after its current step if it stays on time (as LocalPool._worker_to_pause).
        Returns when to ask again, if anything waits for company."""
        while True:
            gpus = [i for i, until in enumerate(self.pool_only_until) if until <= self.now]
            if not gpus:
                return []
            idle = [i for i in gpus if self.gpu_free_at[i] <= self.now]
            batch, wake = self.pool_only.next_batch(min(self.gpu_free_at[idle[0]], self.now) if idle else self.now)
            if batch is None:
                return [wake] if wake is not None else []
            if idle:
                self._launch(batch, idle[0], pool_only=True)
                continue
            seconds = self.world.pool.profile.seconds(*batch.key[:4], batch.slots)
            slack = {i: min(j.deadline for j in self.flexible[i][0].jobs) - self.flexible[i][1] - seconds
                     for i in gpus if self.flexible[i] is not None}
            gpu = max(slack, key=slack.get, default=None)
            if gpu is None or slack[gpu] < 0:  # every running batch would then miss a deadline: wait instead
                self.pool_only.restore(batch.jobs)
                return []
            self._launch(batch, gpu, pool_only=True)

    def _launch(self, batch, gpu: int, pool_only: bool = False) -> None:
        seconds = self.world.pool.profile.seconds(*batch.key[:4], batch.slots)
        start = self.now
        if pool_only:
            flexible = self.flexible[gpu]
            if flexible is not None and flexible[1] > self.now:  # paused after its current step
                paused, end, step_s = flexible
                start += step_s
                self.flexible[gpu] = (paused, end + seconds, step_s)
                self._ends_at(paused, end + seconds, (paused, self.world.pool.profile.seconds(
                    *paused.key[:4], paused.slots)))
                self.preempted += 1
            self.pool_only_until[gpu] = start + seconds
        elif self.pool_only is not None:
            self.flexible[gpu] = (batch, start + seconds, seconds / batch.key[3])
        flexible = self.flexible[gpu]
        self.gpu_free_at[gpu] = max(start + seconds, self.pool_only_until[gpu], flexible[1] if flexible else 0.0)
        self.busy_s += seconds
        minute = int(self.now // 60)
        self.busy_by_minute[minute] = self.busy_by_minute.get(minute, 0.0) + seconds
        self.occupancy = 0.8 * self.occupancy + 0.2 * batch.slots
        self._ends_at(batch, start + seconds, (batch, seconds))

    def _ends_at(self, batch, end: float, event: tuple) -> None:
        self.ends[id(batch)] = end
        for job in batch.jobs:
            self.running_until[id(job)] = end
        self.push(end, "batch_done", event)

    def batch_done(self, batch, seconds: float) -> None:
        if self.ends.get(id(batch)) != self.now:
            return  # paused by a pre-emption: its event at its new end counts
        del self.ends[id(batch)]
        self.flexible = [None if f is not None and f[0] is batch else f for f in self.flexible]
        for job in batch.jobs:
            self.running_until.pop(id(job), None)
            outcome, _, candidate = job.payload
            share = self.world.pool.gpu_hour_usd / 3600 * seconds * job.slots / batch.slots
            self.finish(outcome, "local", share, candidate)
        self.pump()

    def run(self, progress: Callable[[float], None] | None) -> SimResult:
        for req in self.trace:
            self.push(req.t, "arrive", req)
        step = max(1, len(self.trace) // 50)
        arrived = 0
        while self.events:
            self.now, _, kind, data = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(data)
                arrived += 1
                if progress is not None and arrived % step == 0:
                    progress(min(1.0, arrived / len(self.trace)))
            elif kind == "api_done":
                outcome, candidate = data
                if self.finish(outcome, candidate.backend, candidate.predicted_cost_usd, candidate):
                    self.api_spend += candidate.predicted_cost_usd
            elif kind == "retry":
                self.attempt(*data)
            elif kind == "fallback":
                self.fallback(*data)
            elif kind == "hedge":
                self.start_partner(data)
            elif kind == "batch_done":
                self.batch_done(*data)
            elif kind == "wake":
                self.pump()
        horizon = max([self.trace[-1].t if self.trace else 0.0] + [o.done_at or 0 for o in self.outcomes])
        pool = self.world.pool
        gpu_cost = pool.gpus * horizon / 3600 * pool.gpu_hour_usd if pool else 0.0
        result = SimResult(self.strategy.name, self.outcomes, horizon, self.api_spend, gpu_cost, self.busy_s,
                           pool.gpus if pool else 0, released=self.released, hedges=self.hedges,
                           jobs_held=self.held, preempted=self.preempted)
        result.timeline = _timeline(self.outcomes, horizon)
        for row in result.timeline:
            busy = self.busy_by_minute.get(int(row["t"] // 60), 0.0)
            row["gpu_utilisation"] = min(1.0, busy / (60.0 * max(1, result.gpus)))
        return result


def _timeline(outcomes: list[Outcome], horizon: float, bucket_s: float = 60.0) -> list[dict]:
    rows: dict[int, dict] = {}
    for o in outcomes:
        b = int(o.request.t // bucket_s)
        row = rows.setdefault(b, {"t": b * bucket_s, "requests": 0, "api_spend_usd": 0.0, "sla_met": 0,
                                  "mix": Counter()})
        row["requests"] += 1
        row["sla_met"] += o.sla_met
        row["mix"][o.backend or "none"] += 1
        if o.backend not in (None, "local"):
            row["api_spend_usd"] += o.cost_usd
    return [{**r, "mix": dict(r["mix"])} for _, r in sorted(rows.items())]


def simulate(trace: list[TraceRequest], strategy: Strategy | Policy, world: World, *, seed: int = 0,
             progress: Callable[[float], None] | None = None) -> SimResult:
    """Replay `trace` under a strategy (or a plain policy) in `world`."""
    if isinstance(strategy, Policy):
        strategy = Strategy("policy", strategy)
    if strategy.plan is not None and len(strategy.plan) != len(trace):
        raise ValueError(f"the plan has {len(strategy.plan)} choices for a trace of {len(trace)} requests")
    return _Sim(sorted(trace, key=lambda r: r.t), strategy, world, seed).run(progress)


def with_rule(policy: Policy, rule: dict, **changes) -> Policy:
    """A copy of `policy` whose only rule is `rule` (baselines are policies too)."""
    data = policy.model_dump(mode="json")
    data.update(changes, rules=[rule])
    return Policy.model_validate(data)


