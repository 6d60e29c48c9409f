"""Pacing for one backend: the "slow down" signals (429, Retry-After, our own requests-per-minute cap).

A paced backend is never ejected: its calls wait for their turn when the deadline allows, and go
elsewhere (`BackendPaced`, nothing sent) when it does not. Every upstream call takes a turn (each of n,
each submit, each poll), so our own limit never makes a provider answer 429. The window is a sliding
log: at most `per_minute` calls in any 60 s, from the first call on (no full bucket to burst at start).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from backends.errors import BackendPaced

__all__ = ["Pacer", "RateWindow"]

log = logging.getLogger(__name__)

SharedTake = Callable[[str, float], Awaitable[float]]  # (backend, per_minute) -> 0 if taken, else seconds to wait


class RateWindow:
    """At most `limit` calls in any `window_s` seconds (a sliding log of call times)."""

    def __init__(self, limit: float, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit = max(1, int(limit))
        self.window_s = window_s
        self._clock = clock
        self._calls: deque[float] = deque()

    def wait_s(self) -> float:
        """Seconds until a call may go (0: now)."""
        now = self._clock()
        while self._calls and self._calls[0] <= now - self.window_s:
            self._calls.popleft()
        if len(self._calls) < self.limit:
            return 0.0
        return self._calls[0] + self.window_s - now

    def take(self) -> float:
        """Take a turn: 0 when taken, else the seconds to wait."""
        wait = self.wait_s()
        if wait <= 0:
            self._calls.append(self._clock())
        return wait


class Pacer:
    """When one backend's next call may go: a provider's Retry-After pause, then a turn in its window."""

    def __init__(self, name: str, per_minute: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, min_call_s: float = 0.5):
        self.name = name
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self.min_call_s = min_call_s  # a call is not worth starting with less than this before its deadline
        self.window = RateWindow(per_minute, clock=clock) if per_minute else None
        self.shared_take: SharedTake | None = None  # set when replicas share the window (Redis)
        # This replica's share of per_minute while the shared window is away (1 / replicas alive).
        self.local_share: Callable[[], float] = lambda: 1.0
        self._shared_until = 0.0  # when the shared window said a turn frees
        self.paused_until = 0.0
        self.pause_reason = ""
        self._backoff_s = 0.0
        self.calls = 0  # upstream calls let through

    def wait_s(self) -> float:
        """Seconds before the next call could go (for predictions; 0 when it may go now)."""
        now = self._clock()
        window = self._shared_until - now if self.shared_take else (self.window.wait_s() if self.window else 0.0)
        return max(0.0, self.paused_until - now, window)

    @property
    def paced(self) -> bool:
        return self.wait_s() > 0

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """The provider said slow down: pause for its Retry-After, or back off (1, 2, 4 ... 30 s) without one."""
        if retry_after_s is None:
            self._backoff_s = min(30.0, max(1.0, self._backoff_s * 2))
        seconds = retry_after_s if retry_after_s is not None else self._backoff_s
        until = self._clock() + seconds
        if until > self.paused_until:
            if self.paused_until <= self._clock():
                log.info("backend %s paced for %.1f s (provider rate limit)", self.name, seconds)
            self.paused_until = until
            self.pause_reason = "provider rate limit " + (
                f"(Retry-After {retry_after_s:g} s)" if retry_after_s is not None else f"(backing off {seconds:g} s)")

    def on_success(self) -> None:
        self._backoff_s = 0.0

    async def acquire(self, deadline: float) -> None:
        """Wait for this call's turn, or raise BackendPaced when it would come too late for `deadline`."""
        if self.window is None and self.paused_until <= self._clock():
            self.calls += 1
            return
        while True:
            now = self._clock()
            wait = self.paused_until - now
            reason = self.pause_reason
            if wait <= 0:
                wait = await self._take()
                if wait <= 0:
                    self.calls += 1
                    return
                reason = f"{self.per_minute:g} requests per minute"
            if now + wait > deadline - self.min_call_s:
                raise BackendPaced(f"{self.name} paced ({reason}): next call possible in {wait:.1f} s, "
                                   "too late for this request", retry_after_s=wait)
            await self._sleep(wait)

    async def _take(self) -> float:
        if self.window is None:
            return 0.0
        if self.shared_take is not None:
            wait = await self.shared_take(self.name, self.per_minute)
            if wait is not None:
                self._shared_until = self._clock() + wait
                return wait
            # the shared window is unreachable: this replica's share of the limit, locally
            self.window.limit = max(1, int(self.per_minute * self.local_share()))
        return self.window.take()
