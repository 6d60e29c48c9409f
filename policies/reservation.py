"""Trunk reservation for the pool, from the recent arrivals of requests only the pool can serve (as telephone
networks keep trunks for the calls that have no other route). Two levers, both read from one record:

- `max_batch_s`: no batch may run longer than such a request can wait (its SLA less its own run), since a
  running batch cannot be pre-empted; a shorter batch costs the pool little (batch efficiency is flat past a few
  images) and keeps a worker coming free often enough.
- `share`: the share of each worker's time such requests have been taking. Deadline-first, they go ahead of
  work due later, so a request with other candidates is predicted on the pool as if it ran on the rest:
  its wait stretched by 1 / (1 - share). Flexible work that would then miss goes elsewhere.

Plain state fed by the caller's clock: the pool and the simulator keep one each.
"""

from __future__ import annotations

from collections import deque

__all__ = ["MAX_SHARE", "InflexibleArrivals"]

MAX_SHARE = 0.9  # never reserve a whole pool: flexible work keeps a tenth of it, and the share stays finite


class InflexibleArrivals:
    """Requests whose only candidate was the pool, over the last `window_s`."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._seen: deque[tuple[float, float, float]] = deque()  # (arrived, seconds it can wait, its GPU-seconds)

    def record(self, now: float, sla_s: float, service_s: float) -> None:
        self._seen.append((now, max(0.0, sla_s - service_s), service_s))

    def _recent(self, now: float) -> deque[tuple[float, float, float]]:
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        return self._seen

    def max_batch_s(self, now: float) -> float | None:
        """The longest a batch may run while such requests arrive; None while none do."""
        seen = self._recent(now)
        return min(wait for _, wait, _ in seen) if seen else None

    def share(self, now: float, workers: int) -> float:
        """The share of each worker's time such requests took over the window (0 while none arrive)."""
        seen = self._recent(now)
        if not seen:
            return 0.0
        return min(MAX_SHARE, sum(s for _, _, s in seen) / (self.window_s * max(1, workers)))
