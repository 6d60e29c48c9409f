"""SLA-aware dynamic batching: which queued jobs run together, and when.

Jobs are grouped by a compatibility key (model, size, steps, guidance). When a
worker is free, `next_batch()` picks, per key, the largest earliest-deadline-first
prefix whose predicted completion still meets every deadline in it, and launches
it when it is full, when waiting longer would break its tightest deadline, when
the key has more work than one batch, or when its oldest job has waited
`max_wait_s`. Across keys the earliest deadline goes first, so no key starves.

Late binding: a job that has somewhere else to go (the next backend in its decision)
is *tentative* until `start_by`, the last moment that backend could still make its
deadline. `settle()` walks the queue in deadline order; a tentative job predicted to
finish late is given back unstarted at once, while its fallback still has time, and
one still on time at `start_by` is committed (never given back). So in a burst the
pool keeps the jobs that have no good alternative (a tight SLA no API meets reliably)
and lets go of the ones that can still go elsewhere, instead of deciding that once,
at arrival, for whoever happened to come first.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .profile import ThroughputProfile
from .types import QueuePoint

__all__ = ["ArrivalRate", "Batch", "BatchKey", "QueuedJob", "SLABatcher"]

BatchKey = tuple[str, int, int, int, float]  # model, width, height, steps, guidance


@dataclass(eq=False, slots=True)
class QueuedJob:
    key: BatchKey
    slots: int  # images this job needs (its n)
    deadline: float  # monotonic
    enqueued: float
    payload: Any = None  # the job and its future; the batcher never looks inside
    start_by: float | None = None  # tentative until then (see the module doc); None: committed from the start

    @property
    def tentative(self) -> bool:
        return self.start_by is not None


@dataclass(slots=True)
class Batch:
    key: BatchKey
    jobs: list[QueuedJob]
    predicted_s: float
    reason: str  # why it launched now (full, deadline, backlog, max_wait)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.slots = sum(j.slots for j in self.jobs)


class ArrivalRate:
    """Is company coming? The recent gaps between arrivals per batch key: a lone job waits for company only while
    more than half of the last `window` gaps were shorter than the wait. An empirical share rather than a mean:
    closed-loop clients arrive in bursts (seven short gaps, then one as long as a batch), and a mean of those
    gaps said "nobody is coming" to the first job of every burst, which then ran alone."""

    def __init__(self, window: int = 16):
        self.window = window
        self._last: dict = {}
        self._gaps: dict = {}

    def arrived(self, key, now: float) -> None:
        last = self._last.get(key)
        if last is not None:
            gaps = self._gaps.get(key)
            if gaps is None:
                gaps = self._gaps[key] = collections.deque(maxlen=self.window)
            gaps.append(max(0.0, now - last))
        self._last[key] = now

    def expects_company(self, key, within_s: float) -> bool:
        gaps = self._gaps.get(key)
        return bool(gaps) and 2 * sum(1 for g in gaps if g <= within_s) > len(gaps)

    def expects_any(self, within_s: float) -> bool:
        return any(self.expects_company(key, within_s) for key in self._gaps)


class SLABatcher:
    """`put` never blocks; `next_batch` returns a batch to launch now, or when to ask again."""

    def __init__(self, profile: Callable[[], ThroughputProfile], *, max_batch: int = 8, max_wait_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, release_margin: float = 1.2,
                 arrivals: ArrivalRate | None = None, max_batch_s: Callable[[], float | None] | None = None):
        self._profile = profile
        # The longest a batch may run (None: no cap), asked at each plan: while requests only the pool can serve
        # are arriving, a batch that runs longer than they can wait would make them late, since a running batch
        # cannot be pre-empted (policies.reservation).
        self.max_batch_s = max_batch_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # With an ArrivalRate, a lone job waits for company only when some is likely to come; without, it
        # always waits up to max_wait_s.
        self.arrivals = arrivals
        self.release_margin = release_margin  # a tentative job is late when margin x its predicted wait misses
        self._clock = clock
        self._queues: dict[BatchKey, list[QueuedJob]] = {}

    def put(self, item: QueuedJob) -> None:
        if self.arrivals is not None:
            self.arrivals.arrived(item.key, self._clock())
        self._queues.setdefault(item.key, []).append(item)

    def wait_s(self, key: BatchKey) -> float:
        """How long a lone job of this key waits for company."""
        if self.arrivals is None or self.arrivals.expects_company(key, self.max_wait_s):
            return self.max_wait_s
        return 0.0

    def remove(self, item: QueuedJob) -> bool:
        """Withdraw a job that has not launched (its client gave up); True if it was queued."""
        queue = self._queues.get(item.key, [])
        if item in queue:
            queue.remove(item)
            return True
        return False

    def restore(self, jobs: list[QueuedJob]) -> None:
        """Put back jobs a batch took that did not launch after all (their arrivals already counted)."""
        for job in jobs:
            self._queues.setdefault(job.key, []).append(job)

    def take(self, which: Callable[[QueuedJob], bool]) -> list[QueuedJob]:
        """Withdraw every queued job `which` says (expired, abandoned); the rest stay as they were, their arrivals
        not counted again."""
        taken = []
        for key, queue in list(self._queues.items()):
            keep = [j for j in queue if not which(j)]
            taken += [j for j in queue if which(j)]
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]
        return taken

    def drain(self) -> list[QueuedJob]:
        items = [j for q in self._queues.values() for j in q]
        self._queues.clear()
        return items

    @property
    def pending_slots(self) -> int:
        return sum(j.slots for q in self._queues.values() for j in q)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _seconds(self, profile: ThroughputProfile, key: BatchKey, slots: int) -> float:
        return profile.seconds(key[0], key[1], key[2], key[3], slots)

    # --- late binding ----------------------------------------------------------------------

    def _walk(self, now: float, running_s: float, workers: int, release: bool):
        """(job, predicted completion, work so far) in deadline order: the work with earlier deadlines,
        spread over the workers, then the job's own batch. With `release`, tentative jobs predicted
        late are skipped (their work is not counted for those behind them) and yielded with None."""
        profile, workers, size = self._profile(), max(1, workers), self.max_batch
        tables: dict[BatchKey, list[float]] = {}  # seconds of a batch of 0..max_batch, per key
        slots_by_key: dict[BatchKey, int] = {}
        work = running_s
        for job in sorted((j for q in self._queues.values() for j in q), key=lambda j: j.deadline):
            table = tables.get(job.key)
            if table is None:
                table = tables[job.key] = [0.0] + [self._seconds(profile, job.key, n) for n in range(1, size + 1)]
            had = slots_by_key.get(job.key, 0)
            total = had + job.slots
            added = (total // size - had // size) * table[size] + table[total % size] - table[had % size]
            own = table[(total - 1) % size + 1]
            completion = now + (work + added - own) / workers + own
            if release and job.tentative and now + (completion - now) * self.release_margin > job.deadline:
                yield job, None, work
                continue
            slots_by_key[job.key] = total
            work += added
            yield job, completion, work

    def settle(self, now: float, running_s: float, workers: int) -> list[QueuedJob]:
        """Give back the tentative jobs now predicted late (removed from the queue, returned) and commit
        those whose `start_by` has come and that are still on time."""
        released: list[QueuedJob] = []
        if self.next_settle() is None:
            return released  # nothing tentative: nothing to give back or commit
        for job, completion, _ in list(self._walk(now, running_s, workers, release=True)):
            if completion is None:
                self.remove(job)
                released.append(job)
            elif job.tentative and job.start_by <= now:
                job.start_by = None
        return released

    def predicted_done(self, job: QueuedJob, now: float, running_s: float, workers: int) -> float | None:
        """When a queued job is predicted to finish (as `points` predicts it); None if it is not queued."""
        for queued, done, _ in self._walk(now, running_s, workers, release=False):
            if queued is job:
                return done
        return None

    def next_settle(self) -> float | None:
        """When a tentative job's `start_by` comes (settle must run then, busy workers or not)."""
        due = [j.start_by for q in self._queues.values() for j in q if j.start_by is not None]
        return min(due) if due else None

    def points(self, now: float, running_s: float, workers: int) -> tuple[QueuePoint, ...]:
        """The queue in deadline order, for the policy's prediction of where a new job would stand (slack
        with the same margin that decides releases)."""
        margin = self.release_margin
        return tuple(QueuePoint(job.deadline - now, work, job.deadline - now - (done - now) * margin, job.tentative)
                     for job, done, work in self._walk(now, running_s, workers, release=False))

    def _plan(self, key: BatchKey, queue: list[QueuedJob], now: float, profile: ThroughputProfile,
              free_since: float | None = None):
        """(jobs, predicted seconds, launch reason or None, wake time) for one key."""
        queue.sort(key=lambda j: j.deadline)
        chosen, chosen_s, slots = queue[:1], self._seconds(profile, key, queue[0].slots), queue[0].slots

        def binding(job: QueuedJob) -> float:
            # A job that would be late even alone is late whatever the batch; letting it cap the batch
            # would only shrink batches (and throughput) for everyone behind it.
            late_anyway = now + self._seconds(profile, key, job.slots) > job.deadline
            return float("inf") if late_anyway else job.deadline

        tightest = binding(queue[0])
        cap = self.max_batch_s() if self.max_batch_s is not None else None
        for i in range(1, len(queue)):
            slots_i = slots + queue[i].slots
            if slots_i > self.max_batch:
                break
            seconds = self._seconds(profile, key, slots_i)
            if cap is not None and seconds > cap:
                break  # the room kept for requests that only the pool can serve
            if now + seconds > min(tightest, binding(queue[i])):
                break  # a bigger batch would finish too late for someone in it
            chosen, chosen_s, slots = queue[: i + 1], seconds, slots_i
            tightest = min(tightest, binding(queue[i]))
        grow_s = self._seconds(profile, key, min(slots + 1, self.max_batch))
        # Past latest_start, waiting for one more job breaks the tightest deadline; a job already late
        # waits for no one.
        latest_start = tightest - grow_s if binding(queue[0]) < float("inf") else now
        # The wait for company counts from when the job could first have run: its arrival, or the moment a worker
        # came free if it queued behind a running batch. Counted from arrival, closed-loop clients (answered
        # together, back together a moment later) split for good into two half batches: 3 and 5 of 8 at 68% of
        # full-batch throughput in a test, whatever the clients' spread.
        oldest = min(j.enqueued for j in chosen)
        if free_since is not None:
            oldest = max(oldest, free_since)
        wait = self.wait_s(key)
        if slots >= self.max_batch:
            reason = "full"
        elif len(chosen) < len(queue):
            reason = "backlog"
        elif now >= latest_start - 1e-9:
            reason = "deadline"
        elif now - oldest >= wait - 1e-9:
            reason = "max_wait" if wait > 0 else "no_company"
        else:
            reason = None
        return chosen, chosen_s, reason, min(latest_start, oldest + wait)

    def next_batch(self, free_since: float | None = None) -> tuple[Batch | None, float | None]:
        """A batch to launch now (removed from the queue), else (None, when to ask again). `free_since`: when
        the worker asking came free (None: counts from each job's arrival)."""
        now, profile = self._clock(), self._profile()
        best, wake = None, None
        for key, queue in self._queues.items():
            if not queue:
                continue
            jobs, seconds, reason, wake_at = self._plan(key, queue, now, profile, free_since)
            if reason is None:
                wake = wake_at if wake is None else min(wake, wake_at)
            elif best is None or jobs[0].deadline < best.jobs[0].deadline:
                best = Batch(key, jobs, seconds, reason)
        if best is None:
            return None, wake
        queue = self._queues[best.key]
        for job in best.jobs:
            queue.remove(job)
        if not queue:
            del self._queues[best.key]
        return best, None
