"""SLA-aware dynamic batching: which queued jobs run together, and when.

Jobs are grouped by a compatibility key (model, size, steps, guidance). When a
worker is free, `next_batch()` picks, per key, the largest earliest-deadline-first
prefix whose predicted completion still meets every deadline in it, and launches
it when it is full, when waiting longer would break its tightest deadline, when
the key has more work than one batch, or when its oldest job has waited
`max_wait_s`. Across keys the earliest deadline goes first, so no key starves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .profile import ThroughputProfile

__all__ = ["Batch", "BatchKey", "QueuedJob", "SLABatcher"]

BatchKey = tuple[str, int, int, int, float]  # model, width, height, steps, guidance


@dataclass(eq=False, slots=True)
class QueuedJob:
    key: BatchKey
    slots: int  # images this job needs (its n)
    deadline: float  # monotonic
    enqueued: float
    payload: Any = None  # the job and its future; the batcher never looks inside


@dataclass(slots=True)
class Batch:
    key: BatchKey
    jobs: list[QueuedJob]
    predicted_s: float
    reason: str  # why it launched now (full, deadline, backlog, max_wait)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        self.slots = sum(j.slots for j in self.jobs)


class SLABatcher:
    """`put` never blocks; `next_batch` returns a batch to launch now, or when to ask again."""

    def __init__(self, profile: Callable[[], ThroughputProfile], *, max_batch: int = 8, max_wait_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self._profile = profile
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queues: dict[BatchKey, list[QueuedJob]] = {}

    def put(self, item: QueuedJob) -> None:
        self._queues.setdefault(item.key, []).append(item)

    def remove(self, item: QueuedJob) -> bool:
        """Withdraw a job that has not launched (its client gave up); True if it was queued."""
        queue = self._queues.get(item.key, [])
        if item in queue:
            queue.remove(item)
            return True
        return False

    def drain(self) -> list[QueuedJob]:
        items = [j for q in self._queues.values() for j in q]
        self._queues.clear()
        return items

    @property
    def pending_slots(self) -> int:
        return sum(j.slots for q in self._queues.values() for j in q)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def backlog_seconds(self) -> float:
        """Predicted seconds to run everything queued, in the batches it would likely form."""
        profile, total = self._profile(), 0.0
        for key, queue in self._queues.items():
            slots = sum(j.slots for j in queue)
            full, rest = divmod(slots, self.max_batch)
            total += full * self._seconds(profile, key, self.max_batch)
            total += self._seconds(profile, key, rest) if rest else 0.0
        return total

    def _seconds(self, profile: ThroughputProfile, key: BatchKey, slots: int) -> float:
        return profile.seconds(key[0], key[1], key[2], key[3], slots)

    def _plan(self, key: BatchKey, queue: list[QueuedJob], now: float, profile: ThroughputProfile):
        """(jobs, predicted seconds, launch reason or None, wake time) for one key."""
        queue.sort(key=lambda j: j.deadline)
        chosen, chosen_s, slots = queue[:1], self._seconds(profile, key, queue[0].slots), queue[0].slots
        tightest = queue[0].deadline
        for i in range(1, len(queue)):
            slots_i = slots + queue[i].slots
            if slots_i > self.max_batch:
                break
            seconds = self._seconds(profile, key, slots_i)
            if now + seconds > min(tightest, queue[i].deadline):
                break  # a bigger batch would finish too late for someone in it
            chosen, chosen_s, slots = queue[: i + 1], seconds, slots_i
        grow_s = self._seconds(profile, key, min(slots + 1, self.max_batch))
        latest_start = tightest - grow_s  # past this, waiting for one more job breaks the tightest deadline
        oldest = min(j.enqueued for j in chosen)
        if slots >= self.max_batch:
            reason = "full"
        elif len(chosen) < len(queue):
            reason = "backlog"
        elif now >= latest_start - 1e-9:
            reason = "deadline"
        elif now - oldest >= self.max_wait_s - 1e-9:
            reason = "max_wait"
        else:
            reason = None
        return chosen, chosen_s, reason, min(latest_start, oldest + self.max_wait_s)

    def next_batch(self) -> tuple[Batch | None, float | None]:
        """A batch to launch now (removed from the queue), else (None, when to ask again)."""
        now, profile = self._clock(), self._profile()
        best, wake = None, None
        for key, queue in self._queues.items():
            if not queue:
                continue
            jobs, seconds, reason, wake_at = self._plan(key, queue, now, profile)
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
