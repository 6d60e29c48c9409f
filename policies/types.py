"""The policy engine's vocabulary: plain, immutable data in and out of `decide()`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum

from .profile import ThroughputProfile
from .reservation import DENSER, MAX_SHARE, PRESSED_SHARE, SATURATED_SHARE

__all__ = [
    "BackendKind",
    "BackendView",
    "Candidate",
    "Decision",
    "Health",
    "LatencyModel",
    "PoolModel",
    "QueuePoint",
    "RejectReason",
    "Rejection",
    "RouteRequest",
    "SizeSupport",
    "Snapshot",
]


class BackendKind(StrEnum):
    LOCAL = "local"
    API = "api"


class Health(StrEnum):
    """What the gateway knows of a backend's ability to take work right now."""

    OK = "ok"
    UNCONFIGURED = "unconfigured"  # no key, no weights: never chosen
    WARMING = "warming"  # loading or compiling: not chosen yet
    OPEN = "open"  # circuit breaker open after failures
    HALF_OPEN = "half_open"  # one probe allowed


class RejectReason(StrEnum):
    """Machine-readable reasons a backend was not a candidate (stable: clients may match on them)."""

    DISABLED = "disabled"
    UNCONFIGURED = "unconfigured"
    UNHEALTHY = "unhealthy"
    NOT_READY = "not_ready"
    NOT_REQUESTED = "not_requested_model"
    MODEL_UNAVAILABLE = "model_unavailable"
    QUALITY_BELOW_TIER = "quality_below_tier"
    RULE_DENY = "rule_deny"
    SIZE_UNSUPPORTED = "size_unsupported"
    N_UNSUPPORTED = "n_unsupported"
    SLA_MISS = "sla_miss"
    COST_CEILING = "cost_ceiling"
    NOT_IN_POLICY = "not_in_policy"
    RESERVED = "reserved"  # the pool's room is kept for work only it can serve; this request has others


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the engine needs to know of one image request (already validated)."""

    width: int
    height: int
    n: int = 1
    steps: int | None = None
    tenant: str = "anonymous"
    tier: str | None = None
    sla_ms: int | None = None
    max_cost_usd: float | None = None
    backend: str | None = None  # a named backend ("model": "reve" or "reve/reve-create")
    model: str | None = None
    tags: frozenset[str] = frozenset()
    quality: str | None = None  # OpenAI's quality field, for price lists that charge by it

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000


@dataclass(frozen=True, slots=True)
class SizeSupport:
    """Which output sizes a backend can make: bounds, or an explicit list."""

    min_side: int = 64
    max_side: int = 4096
    multiple_of: int = 1
    max_pixels: int | None = None
    exact: frozenset[tuple[int, int]] = frozenset()  # when set, only these

    def allows(self, width: int, height: int) -> bool:
        if self.exact:
            return (width, height) in self.exact
        short, long = (width, height) if width <= height else (height, width)
        return (
            self.min_side <= short
            and long <= self.max_side
            and (self.multiple_of == 1 or (width % self.multiple_of == 0 and height % self.multiple_of == 0))
            and (self.max_pixels is None or width * height <= self.max_pixels)
        )


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Predicted completion time in ms: the prior or observed quantile, plus, for the local
    pool, its queue model (work ahead and its own batch)."""

    p50_ms: float
    p95_ms: float
    # The pool's queue model predicts a mean; p95 allows for jobs that overtake. 1.25 until the overtaking by
    # worthier requests was predicted on its own (PoolModel.denser_delay_s); 1.1 since, measured on three seeds
    # (docs/benchmarks.md, issue 18 session 8): mixed_shapes at 2/s 98.7% -> 99.1%, tight_drafts at 2/s +0.3 pt.
    pool_p95_factor: float = 1.1

    @property
    def p99_ms(self) -> float:
        """Extrapolated as a lognormal through p50 and p95 (z 2.326 vs 1.645)."""
        return self.p50_ms * (max(self.p95_ms, self.p50_ms) / self.p50_ms) ** (2.326 / 1.645) if self.p50_ms > 0 \
            else self.p95_ms

    def predict(self, request: RouteRequest, steps: int, quantile: str, pool: PoolModel | None = None,
                sla_ms: float | None = None) -> float:
        fixed = self.p95_ms if quantile == "p95" else self.p50_ms
        if pool is not None:
            factor = self.pool_p95_factor if quantile == "p95" else 1.0
            budget_s = (sla_ms - fixed) / 1000 / factor if sla_ms else None  # what the pool's part may take
            due_s = sla_ms / 1000 if sla_ms else None
            return fixed + pool.stay_s(request, steps, budget_s, due_s) * 1000 * factor
        return fixed


@dataclass(frozen=True, slots=True)
class QueuePoint:
    """One queued job as the policy sees it: seconds to its deadline, the work (running + queued, in
    batches) up to and including it in deadline order, its predicted slack, and whether it may still
    be given back."""

    deadline_in_s: float
    work_s: float
    slack_s: float
    tentative: bool


@dataclass(frozen=True, slots=True)
class PoolModel:
    """The local pool as a queue: its throughput profile, the work ahead, its workers, its price."""

    profile: ThroughputProfile
    model: str
    gpu_hour_usd: float
    workers: int = 1
    work_ahead_s: float = 0.0  # queued + still-running batch seconds, summed over workers
    typical_batch: float = 1.0  # observed images per batch (occupancy)
    has_headroom: bool = True  # an idle worker and nothing queued: the marginal image costs ~0
    busy_workers: int = 0  # workers running a batch now (ops: the pool's GPU use)
    max_wait_s: float = 0.0  # how long the batcher holds a lone job for company
    running_s: float = 0.0  # what the running batches still need, summed over workers
    queue: tuple[QueuePoint, ...] | None = None  # the queue in deadline order; None: all of work_ahead_s is ahead
    # A new job may go ahead of a committed one only if that one keeps this many such jobs' worth of slack:
    # in overload the queue runs slower than predicted (smaller batches, mixed shapes), and a committed job
    # can no longer be given back. 4 measured best in a one-GPU overload (docs/benchmarks.md, late binding); on
    # the issue-18 traces with 2 GPUs, 1 (the job it lets ahead still leaves it on time) costs 1-6% less at
    # equal or better SLA on 3 seeds (docs/benchmarks.md, issue 18 session 7): a larger reserve sends tight
    # work to an API while the pool's committed work would have finished in time anyway.
    committed_reserve: float = 1.0
    # Trunk reservation (policies.reservation): the share of each worker's time that work only the pool can serve
    # has been taking; a request with other candidates is predicted as if the pool had only the rest.
    reserved_share: float = 0.0
    sustained_share: float = 0.0  # the same over the last minute alone (not the last seconds)
    batch_cap_s: float | None = None  # the longest a batch may run while such work arrives (None: none does)
    # Recent demand for the pool by what it was worth per GPU-second (policies.reservation.PoolDemand.table):
    # (value, SLA s, share of each worker's time over the last minute, the same over the last 10 s).
    demand: tuple[tuple[float, float, float, float], ...] = ()
    # Pre-emption: the pool's workers pause a running batch of flexible work after its current denoising step to
    # run a batch of pool-only work (Candidate.preempts). Such work is predicted against the pool-only work alone
    # (`pool_only`), and flexible work with its whole stay, run included, stretched by 1 / (1 - reserved_share).
    preemptive: bool = False
    pool_only_queue: tuple[QueuePoint, ...] = ()  # the pool-only queue, in deadline order
    pool_only_running_s: float = 0.0  # pool-only batches still running, plus a step of each batch they would pause

    @property
    def saturated(self) -> bool:
        """Work only the pool can serve took SATURATED_SHARE of it over the last minute: flexible work keeps off
        (a pool that pre-empts runs flexible work between such work's batches instead)."""
        return not self.preemptive and self.sustained_share >= SATURATED_SHARE

    def pool_only(self) -> PoolModel:
        """The pool as a request that pre-empts sees it: only the pool-only work goes ahead of it."""
        queue, running = self.pool_only_queue, self.pool_only_running_s
        return dataclasses.replace(self, queue=queue, running_s=running,
                                   work_ahead_s=queue[-1].work_s if queue else running, reserved_share=0.0,
                                   preemptive=False, demand=())

    def stay_s(self, request: RouteRequest, steps: int, sla_s: float | None = None,
               due_s: float | None = None) -> float:
        """`completion_s`, stretched on a pool that pre-empts by the pool-only work that pauses it meanwhile."""
        seconds = self.completion_s(request, steps, sla_s, due_s)
        if self.preemptive and self.reserved_share > 0:
            seconds /= 1 - min(self.reserved_share, MAX_SHARE)
        return seconds

    def fits_between(self, own_s: float) -> bool:
        """A job with other candidates (its own run alone `own_s`) that may still take a saturated pool: a worker
        is idle, nothing is queued, and its run is no longer than the batch cap, so it delays the pool-only work
        no more than one of that work's own batches would."""
        return self.has_headroom and self.batch_cap_s is not None and own_s <= self.batch_cap_s

    @property
    def pressed(self) -> bool:
        """Work only the pool can serve takes PRESSED_SHARE of it or more: a late job here would take its room."""
        return self.reserved_share >= PRESSED_SHARE

    def ahead_s(self, sla_s: float | None) -> float:
        """Work that runs before a new job due in `sla_s`: the batcher goes by earliest deadline."""
        if self.queue is None:
            return self.work_ahead_s
        ahead = self.running_s
        for point in self.queue:
            if sla_s is not None and point.deadline_in_s > sla_s:
                break
            ahead = point.work_s
        return ahead

    def delays_committed(self, request: RouteRequest, steps: int, sla_s: float | None,
                         reserve: float | None = None) -> bool:
        """Would a new job due in `sla_s` eat into the slack of a committed job (one that can no longer go
        elsewhere) that is on time now, leaving it less than `reserve` (default `committed_reserve`) such
        jobs' worth? It runs before every job due later."""
        if self.queue is None or sla_s is None:
            return False
        own = self.profile.seconds(self.model, request.width, request.height, steps, request.n) / max(self.workers, 1)
        reserve = self.committed_reserve if reserve is None else reserve
        return any(not p.tentative and p.deadline_in_s > sla_s and 0 <= p.slack_s < own * reserve for p in self.queue)

    def completion_s(self, request: RouteRequest, steps: int, sla_s: float | None = None,
                     due_s: float | None = None) -> float:
        """Predicted seconds until a new job of this shape is done: its share of the work ahead, then its
        batch, as big as the batches the pool is running now (alone when idle, full when busy). A job
        that finds nothing ahead waits for company first (the batcher's max_wait, cut short by its SLA).
        `sla_s` (the time its batch may take) defaults to the request's own SLA; `due_s` (where it stands
        in the deadline-ordered queue) to `sla_s`."""
        if sla_s is None and request.sla_ms:
            sla_s = request.sla_ms / 1000
        work_ahead = self.ahead_s(sla_s if due_s is None else due_s)
        batch = max(request.n, round(self.typical_batch)) if work_ahead > 0 else request.n
        own = self.profile.seconds(self.model, request.width, request.height, steps, batch)
        if work_ahead > 0:
            ahead = work_ahead / max(self.workers, 1)
            if sla_s is not None and ahead + own > sla_s and batch > request.n:
                # The batcher sizes a batch by its tightest deadline: a job with little slack rides in a
                # smaller batch than the typical one, down to its own images alone.
                for smaller in range(batch - 1, request.n - 1, -1):
                    own = self.profile.seconds(self.model, request.width, request.height, steps, smaller)
                    if ahead + own <= sla_s:
                        break
            return ahead + own
        slack = sla_s - own if sla_s is not None else self.max_wait_s
        return own + max(0.0, min(self.max_wait_s, slack))

    def reserved_delay_s(self, sla_s: float | None) -> float:
        """How much later than `completion_s` a job with other candidates is predicted to finish: the pool-only
        work arriving meanwhile goes ahead of it (deadline first), stretching its wait by 1 / (1 - share). On a pool
        that pre-empts, `stay_s` has stretched its whole stay already."""
        if self.reserved_share <= 0 or self.preemptive:
            return 0.0
        wait = self.ahead_s(sla_s) / max(self.workers, 1)
        return wait * self.reserved_share / (1 - self.reserved_share)

    def denser_delay_s(self, sla_s: float | None, value: float) -> float:
        """How much later than `completion_s` a job worth `value` per GPU-second to the pool and due in `sla_s` is
        predicted to finish: recent requests worth DENSER times more with a tighter SLA go ahead of it (deadline
        first) at their share of the pool, while they can overtake it (for its SLA less theirs)."""
        if not self.demand or sla_s is None:
            return 0.0
        minute = burst = weighted = 0.0
        for worth, sla, minute_share, burst_share in self.demand:
            if worth > value * DENSER and sla < sla_s:
                minute += minute_share
                burst += burst_share
                weighted += minute_share * (sla_s - sla)
        share = min(MAX_SHARE, max(minute, burst))
        if share <= 0 or minute <= 0:
            return 0.0
        wait = self.ahead_s(sla_s) / max(self.workers, 1)
        stretched, overtaking_s = wait / (1 - share), weighted / minute
        return stretched - wait if stretched <= overtaking_s else share * overtaking_s

    def gpu_seconds_per_image(self, request: RouteRequest, steps: int) -> float:
        batch = max(request.n, round(self.typical_batch))
        return self.profile.seconds_per_image(self.model, request.width, request.height, steps, batch)


@dataclass(frozen=True, slots=True)
class BackendView:
    """One backend as the engine sees it at decision time."""

    name: str
    kind: BackendKind
    health: Health
    models: tuple[str, ...]
    sizes: SizeSupport
    max_n: int
    default_steps: int
    latency: LatencyModel
    pool: PoolModel | None = None  # the local pool's queue model; None for APIs
    wait_ms: float = 0.0  # pacing: how long its next call waits for a turn (429 pause, requests per minute)
    inflight: int = 0  # calls in flight now: equal candidates share traffic by it


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the world at decision time."""

    backends: tuple[BackendView, ...]

    def get(self, name: str) -> BackendView | None:
        for view in self.backends:
            if view.name == name:
                return view
        return None


# decide()'s outputs (Candidate, Rejection, Decision) are not frozen: a frozen dataclass is built through
# object.__setattr__, 5x slower (0.73 vs 0.15 us each, ~10 per decision); nothing changes them after
# decide() returns (dataclasses.replace makes a new one).
@dataclass(slots=True)
class Candidate:
    backend: str
    model: str
    predicted_latency_ms: float
    predicted_cost_usd: float
    quality: float
    steps: int
    # For a queueing backend with a fallback: give the job back unstarted if it would finish late, up to
    # this long after the decision (the SLA less the next candidate's p99), so the fallback still makes it.
    start_within_ms: float | None = None
    p99_ms: float | None = None  # an API's predicted p99: past it, the dispatcher starts the next candidate
    # Expected completion under live load (p50 x (1 + calls in flight) for an API, plus any pacing wait):
    # ranks equal candidates, so two deployments of one price share traffic and a slow one gets less.
    expected_ms: float = 0.0
    # A pool tried for a shape it has never measured, though its (unmeasured) prediction misses the SLA: it is
    # idle, and the SLA less the next candidate's prediction bounds the try, so the pool learns instead of being
    # refused forever on a guess.
    probe: bool = False
    # Only the pool can serve it in time: it goes ahead of flexible work, pausing a running batch of it after that
    # batch's current step on a pool that pre-empts (PoolModel.preemptive), and is predicted so.
    preempts: bool = False


@dataclass(slots=True)
class Rejection:
    backend: str
    reason: RejectReason
    detail: str


@dataclass(slots=True)
class Decision:
    """Ranked candidates (best first) and every rejected backend with its reason."""

    policy_version: str
    tier: str
    sla_ms: int
    max_cost_usd: float | None
    objective: str
    rule: str | None
    candidates: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...]
    reason: str
    hedge: bool = False
    notes: tuple[str, ...] = field(default=())
    at_risk: bool = False  # best effort: no candidate was predicted to meet the SLA (tier on_no_candidate)
    # The pool could serve it: (the pool, its GPU-seconds alone there, what the pool is worth to it per GPU-second:
    # the cheapest API's price for it over that time; inf where no API may serve it), for reservation.PoolDemand.
    pool_demand: tuple[str, float, float] | None = None

    @property
    def serve_within_ms(self) -> float:
        """How long the request may take: its SLA, or for a best-effort one, what its first candidate needs
        (with room for its tail), so it is not cut at an SLA it was never going to meet."""
        if not self.at_risk or not self.candidates:
            return self.sla_ms
        return max(self.sla_ms, 1.5 * self.candidates[0].predicted_latency_ms)

    @property
    def chosen(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def hedge_partner(self, first: Candidate, rest, *, hedging: bool | None = None) -> Candidate | None:
        """The candidate to race against `first` when hedging (the decision's own setting unless `hedging` says):
        the next one, unless the cost cap cannot pay for both. The dispatcher and the simulator both ask this."""
        if not (self.hedge if hedging is None else hedging) or not rest:
            return None
        second = rest[0]
        if self.max_cost_usd is not None and first.predicted_cost_usd + second.predicted_cost_usd > self.max_cost_usd:
            return None
        return second
