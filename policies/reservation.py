"""Trunk reservation for the pool: how much backlog requests with other candidates may leave on it, from the
recent arrivals of requests only the pool can serve (as telephone networks keep trunks for the calls that have no
other route). Plain state fed by the caller's clock: the pool and the simulator keep one each."""

from __future__ import annotations

from collections import deque

__all__ = ["InflexibleArrivals"]


class InflexibleArrivals:
    """Requests whose only candidate was the pool, over the last `window_s`."""

    def __init__(self, window_s: float = 60.0):
        self.window_s = window_s
        self._seen: deque[tuple[float, float]] = deque()  # (arrived, seconds it can wait: SLA - its own run)

    def record(self, now: float, sla_s: float, service_s: float) -> None:
        self._seen.append((now, max(0.0, sla_s - service_s)))

    def backlog_limit_s(self, now: float) -> float | None:
        """The backlog per worker past which the pool takes only such requests; None while none arrive."""
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        return min(wait for _, wait in self._seen) if self._seen else None
