"""Trunk reservation for the pool, from the recent arrivals of requests only the pool can serve (as telephone
networks keep trunks for the calls that have no other route). Two levers, both read from one record:

- `max_batch_s`: no batch may run longer than such a request can wait (its SLA less its own run), since a
  running batch cannot be pre-empted; a shorter batch costs the pool little (batch efficiency is flat past a few
  images) and keeps a worker coming free often enough.
- `share`: the share of each worker's time such requests have been taking. Deadline-first, they go ahead of
  work due later, so a request with other candidates is predicted on the pool as if it ran on the rest:
  its wait stretched by 1 / (1 - share). Flexible work that would then miss goes elsewhere, and so does a
  best-effort request (late wherever it goes) once the share passes PRESSED_SHARE; once the minute-long share
  alone passes SATURATED_SHARE, flexible work keeps off the pool altogether.

Plain state fed by the caller's clock: the pool and the simulator keep one each, and record what `room_for` says
as each request is decided; `hedge_pays` says when a pool job passing its predicted latency is worth racing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .batching import QueuedJob, SLABatcher
    from .types import Candidate, Decision, Snapshot

__all__ = ["DENSER", "HEDGE_MARGIN", "MAX_SHARE", "PRESSED_SHARE", "SATURATED_SHARE", "InflexibleArrivals",
           "PoolArrival", "PoolDemand", "hedge_pays", "pool_arrival", "pool_job_hedge_pays", "room_for"]

MAX_SHARE = 0.9  # never reserve a whole pool: flexible work keeps a tenth of it, and the share stays finite
# Past this share the pool is pressed (PoolModel.pressed): a best-effort request (no backend predicted in time)
# tries the API predicted to finish first before it, and a request placed on it is hedged. A late job on a pool
# busy with work that has nowhere else to go makes that work late too, and the misses cascade through a burst.
# Measured on three seeds (docs/benchmarks.md): 0.3 lifts tight_drafts at 2/s from 84-85% to 94.5-95% SLA;
# 0.2 and 0.0 also send the big drafts a lightly loaded pool would finish nearly in time (mixed_shapes at 1/s:
# 99.4% -> 98.6-98.9%), and 0.4 reacts too late for mixed_shapes at 2-3/s.
PRESSED_SHARE = 0.3
# Past this share over the whole window (a sustained load, not a ten-second cluster) a request with other
# candidates keeps off the pool (PoolModel.saturated): the stretch of its wait by 1 / (1 - share) is a mean, and a
# flexible batch admitted with little ahead of it still holds a worker the next pool-only requests then wait for.
# Measured on three seeds (docs/benchmarks.md, issue 18 session 7): mixed_shapes at 2-3/s 96.8-97.7% -> 98.4-98.8%
# SLA for +2-10% cost; 0.3 buys a little more SLA at 1.5-2x the extra cost, and costs +7-11% at 1/s.
SATURATED_SHARE = 0.4


def room_for(decision: Decision, snapshot: Snapshot) -> tuple[Candidate, float] | None:
    """The pool place (and its GPU-seconds alone) of a request the pool keeps room for, recorded as it is decided
    (InflexibleArrivals.record), wherever it is then sent: one only a queueing pool can serve in time, or a best
    effort one (no backend predicted in time) that the pool alone would serve within half its SLA. Counting the
    latter keeps a second steady state away: drafts late everywhere, served late on a pool that no longer looked
    pressed because they were not counted, which then took flexible work that made the next drafts late too
    (mixed_shapes at 3/s fell to 74% SLA on a 0.3 change of a margin; docs/benchmarks.md, issue 18 session 8)."""
    pooled = [(c, v.latency) for c in decision.candidates
              if (v := snapshot.get(c.backend)) is not None and v.pool is not None]
    if not pooled or decision.pool_demand is None:
        return None
    candidate, latency = pooled[0]
    alone_s = decision.pool_demand[1]  # a pool among the candidates passed the checks that set it
    if len(pooled) == len(decision.candidates) or (
            decision.at_risk and alone_s + latency.p95_ms / 1000 <= decision.sla_ms / 2000):
        return candidate, alone_s
    return None


@dataclass(frozen=True, slots=True)
class PoolArrival:
    """What a pool records of one request it could serve, as it is routed, wherever it is then sent: the gateway's
    pool (LocalPool.note_arrival) and the simulator's record it the same way, from the same function."""

    pool: str
    sla_s: float
    gpu_s: float  # its batch alone, by the pool's profile
    value: float  # what the pool saves it per GPU-second (Decision.pool_demand)
    keep_room: bool  # room_for: the pool keeps room for requests like it

    def record(self, now: float, inflexible: InflexibleArrivals, demand: PoolDemand) -> None:
        if self.keep_room:
            inflexible.record(now, self.sla_s, self.gpu_s)
        demand.record(now, self.sla_s, self.gpu_s, self.value)


def pool_arrival(decision: Decision, snapshot: Snapshot) -> PoolArrival | None:
    """The record of a request a pool could serve (Decision.pool_demand), None when no pool could."""
    if decision.pool_demand is None:
        return None
    name, gpu_s, value = decision.pool_demand
    return PoolArrival(name, decision.sla_ms / 1000, gpu_s, value, room_for(decision, snapshot) is not None)


# A pool job passing its predicted latency is raced by an API only if the pool, asked then, predicts it late: its
# predicted finish (the wait of a queued one stretched by 1 / (1 - share), as pool-only work still arriving goes
# ahead of it) times this margin past its SLA. Measured on three seeds (docs/benchmarks.md, issue 18 session 8):
# tight_drafts at 1/s 14% cheaper and mixed_shapes at 2/s 9% at equal SLA (within 0.2 pt); a hedge started on
# elapsed time alone mostly paid an API for an image the pool then delivered in time.
HEDGE_MARGIN = 1.3


def hedge_pays(done_in_s: float, due_in_s: float, share: float, *, running: bool = False) -> bool:
    """Should a pool job predicted done in `done_in_s` be raced now, with `due_in_s` left to its SLA? A queued
    one's wait stretches by 1 / (1 - share) (the pool-only share, policies.reservation); a running batch cannot
    be overtaken."""
    stretch = 1.0 if running else 1 / (1 - min(max(share, 0.0), MAX_SHARE))
    return done_in_s * stretch * HEDGE_MARGIN > due_in_s


def pool_job_hedge_pays(batcher: SLABatcher, job: QueuedJob, now: float, due: float, *, running_until: float | None,
                        running_s: float, workers: int, share: float) -> bool:
    """`hedge_pays` for a job a pool holds, running (until `running_until`) or queued in `batcher` behind
    `running_s` of running work: one answer for the gateway's pool and the simulator's. A job the batcher no
    longer holds says yes."""
    if running_until is not None:
        return hedge_pays(running_until - now, due - now, 0.0, running=True)
    done = batcher.predicted_done(job, now, running_s, workers)
    return done is None or hedge_pays(done - now, due - now, share)


class _Window:
    """GPU-seconds recorded over the last `span_s`, summed per key as records arrive and leave; a key goes with
    its last record, so an empty window sums to exactly nothing, whatever rounding left."""

    def __init__(self, span_s: float):
        self.span_s = span_s
        self._seen: deque[tuple[float, object, float]] = deque()  # (arrived, key, GPU-seconds)
        self.sums: dict[object, float] = {}
        self._counts: dict[object, int] = {}

    def add(self, now: float, key: object, seconds: float) -> None:
        self._seen.append((now, key, seconds))
        self.sums[key] = self.sums.get(key, 0.0) + seconds
        self._counts[key] = self._counts.get(key, 0) + 1

    def expire(self, now: float) -> None:
        while self._seen and self._seen[0][0] < now - self.span_s:
            _, key, seconds = self._seen.popleft()
            self._counts[key] -= 1
            if self._counts[key]:
                self.sums[key] -= seconds
            else:
                del self._counts[key], self.sums[key]


class InflexibleArrivals:
    """Requests whose only candidate was the pool, over the last `window_s`; their share is the larger of that
    window's and the last `burst_window_s`'s, so that a burst is seen within seconds (over a minute alone, the
    flexible work admitted in its first seconds filled the pool it needed) and forgotten over a minute. Sums and
    the least wait are kept as records arrive and leave (a sliding-window minimum), so a snapshot reads them in
    constant time however many arrive: the pool asks on every request."""

    def __init__(self, window_s: float = 60.0, burst_window_s: float = 10.0):
        self.window_s = window_s
        self.burst_window_s = burst_window_s
        self._minute, self._burst = _Window(window_s), _Window(burst_window_s)
        self._waits: deque[tuple[float, float]] = deque()  # (arrived, wait): waits rise front to back

    def record(self, now: float, sla_s: float, service_s: float) -> None:
        # What it can wait for a running batch: its SLA less its own batch, which the same cap bounds (a batch
        # in a burst holds more than it alone): half the SLA, or what its own run leaves when that is more.
        wait = max(0.0, sla_s - max(service_s, sla_s / 2))
        while self._waits and self._waits[-1][1] >= wait:  # never the minimum again while this one is recent
            self._waits.pop()
        self._waits.append((now, wait))
        self._minute.add(now, None, service_s)
        self._burst.add(now, None, service_s)

    def _expire(self, now: float) -> None:
        self._burst.expire(now)
        self._minute.expire(now)
        while self._waits and self._waits[0][0] < now - self.window_s:
            self._waits.popleft()

    def max_batch_s(self, now: float) -> float | None:
        """The longest a batch may run while such requests arrive; None while none do."""
        self._expire(now)
        return self._waits[0][1] if self._waits else None

    def sustained_share(self, now: float, workers: int) -> float:
        """The share of each worker's time such requests took over the whole window (0 while none arrive)."""
        self._expire(now)
        if None not in self._minute.sums:
            return 0.0
        return min(MAX_SHARE, self._minute.sums[None] / (self.window_s * max(1, workers)))

    def share(self, now: float, workers: int) -> float:
        """The larger of `sustained_share` and the same over the last `burst_window_s` (0 while none arrive)."""
        sustained = self.sustained_share(now, workers)
        if not sustained:
            return 0.0
        over_burst = max(0.0, self._burst.sums.get(None, 0.0)) / (self.burst_window_s * max(1, workers))
        return min(MAX_SHARE, max(sustained, over_burst))


# A request is predicted on the pool as if the recent requests that valued the pool at least this many times more
# per GPU-second than it does, and can overtake it (a tighter SLA, deadline first), went ahead of it (PoolDemand).
DENSER = 1.1


class PoolDemand:
    """Every recent request the pool could have served, by what the pool was worth to it per GPU-second (the
    cheapest API's price for it over its pool time alone) and its SLA: a shadow price of pool time. When the pool
    is short, a request worth less per GPU-second (more pool time for the same API price: 30 steps against a
    20-step draft) is the one to send elsewhere, so such a request is predicted with the pool time of the
    worthier ones that may overtake it (PoolModel.denser_delay_s). Sums per (value, SLA) are kept as records
    arrive and leave, over the last `window_s` and the last `burst_window_s`, so the table a snapshot carries is
    as small as the number of kinds of request, however many arrive."""

    def __init__(self, window_s: float = 60.0, burst_window_s: float = 10.0):
        self.window_s, self.burst_window_s = window_s, burst_window_s
        self._minute, self._burst = _Window(window_s), _Window(burst_window_s)

    def record(self, now: float, sla_s: float, service_s: float, value: float) -> None:
        key = (float(f"{value:.3g}"), round(sla_s, 1))
        self._minute.add(now, key, service_s)
        self._burst.add(now, key, service_s)

    def table(self, now: float, workers: int) -> tuple[tuple[float, float, float, float], ...]:
        """(value, SLA s, share of each worker's time over the window, the same over the burst window)."""
        self._minute.expire(now)
        self._burst.expire(now)
        per_worker = max(1, workers)
        burst = self._burst.sums
        return tuple((value, sla, max(0.0, minute) / (self.window_s * per_worker),
                      max(0.0, burst.get((value, sla), 0.0)) / (self.burst_window_s * per_worker))
                     for (value, sla), minute in self._minute.sums.items())
