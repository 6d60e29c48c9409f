"""Per-backend circuit breaker: opens on consecutive failures or a high error rate, probes half-open."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from policies.types import Health

__all__ = ["BreakerConfig", "CircuitBreaker"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int = 5
    error_rate: float = 0.5  # over the window, once min_requests were seen
    window_s: float = 60.0
    min_requests: int = 10
    cooldown_s: float = 30.0  # open -> half-open
    auth_cooldown_s: float = 300.0  # bad key or account: no point probing sooner


class CircuitBreaker:
    """closed -> open (cooldown) -> half_open (one probe) -> closed on success, open on failure."""

    def __init__(self, config: BreakerConfig = BreakerConfig(), clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._consecutive = 0
        self._open_until = 0.0
        self._opened = False
        self._probe_in_flight = False
        self.reason = ""
        self.on_open: Callable[[float, str], None] | None = None  # told when this replica opens it
    @property
    def state(self) -> str:
        if not self._opened:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def health(self) -> Health:
        return {"closed": Health.OK, "open": Health.OPEN, "half_open": Health.HALF_OPEN}[self.state]

    def allow(self) -> bool:
        """May a call go through now? Half-open lets exactly one probe through at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def on_success(self) -> None:
        self._record(True)
        self._consecutive = 0
        if self._opened:
            self._opened, self._probe_in_flight, self.reason = False, False, ""

    def on_failure(self, reason: str = "failures") -> None:
        self._record(False)
        self._consecutive += 1
        if self._opened:  # the probe failed
            self.open_for(self.config.cooldown_s, f"probe failed: {reason}")
        elif self._consecutive >= self.config.consecutive_failures:
            self.open_for(self.config.cooldown_s, f"{self._consecutive} consecutive failures ({reason})")
        elif self._error_rate_exceeded():
            self.open_for(self.config.cooldown_s, f"error rate over {self.config.error_rate:.0%} ({reason})")

    def on_neutral(self) -> None:
        """An outcome that says nothing about health (the client's fault): releases a probe."""
        self._probe_in_flight = False

    def open_for(self, seconds: float, reason: str, *, shared: bool = False) -> None:
        """Open for `seconds`; `shared` marks a state learnt from another replica (not re-announced)."""
        until = self._clock() + seconds
        if self._opened and until <= self._open_until:
            return
        self._opened, self._probe_in_flight = True, False
        self._open_until = until
        self.reason = reason
        if self.on_open is not None and not shared:
            self.on_open(seconds, reason)

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, ok))
        while self._outcomes and self._outcomes[0][0] < now - self.config.window_s:
            self._outcomes.popleft()

    def _error_rate_exceeded(self) -> bool:
        total = len(self._outcomes)
        if total < self.config.min_requests:
            return False
        failures = sum(1 for _, ok in self._outcomes if not ok)
        return failures / total > self.config.error_rate
