"""Per-backend admission: circuit breaker, concurrency cap and requests-per-minute limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from backends.errors import (
    BackendAuthError,
    BackendError,
    BackendRateLimited,
    BackendReleased,
    BackendRequestRejected,
)
from policies.types import Health

from .breaker import BreakerConfig, CircuitBreaker

__all__ = ["BackendGuard", "TokenBucket"]


class TokenBucket:
    """Requests per minute as a token bucket (burst up to the per-minute figure)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self._tokens = per_minute
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def try_take(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def has_token(self) -> bool:
        self._refill()
        return self._tokens >= 1


class BackendGuard:
    """Says whether a backend may take a call now, and learns from each call's outcome."""

    def __init__(self, *, breaker: BreakerConfig = BreakerConfig(), max_concurrency: int | None = None,
                 requests_per_minute: float | None = None, clock: Callable[[], float] = time.monotonic,
                 shared_rate_limit: bool = False):
        self.breaker = CircuitBreaker(breaker, clock)
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        # With a shared store the dispatcher takes tokens from it (every replica draws on one bucket).
        local = requests_per_minute and not shared_rate_limit
        self.bucket = TokenBucket(requests_per_minute, clock) if local else None
        self.inflight = 0

    def health(self) -> tuple[Health, str]:
        """For the snapshot: breaker state, or capacity exhausted, else OK."""
        health = self.breaker.health()
        if health is not Health.OK:
            return health, self.breaker.reason
        if self.max_concurrency is not None and self.inflight >= self.max_concurrency:
            return Health.OPEN, f"at its concurrency cap ({self.max_concurrency})"
        if self.bucket is not None and not self.bucket.has_token():
            return Health.OPEN, "requests-per-minute limit reached"
        return Health.OK, ""

    def admit(self) -> str | None:
        """Take a slot for one call; returns why not, or None when admitted (then call release())."""
        if self.max_concurrency is not None and self.inflight >= self.max_concurrency:
            return "concurrency cap reached"
        if not self.breaker.allow():
            return f"circuit {self.breaker.state}: {self.breaker.reason}"
        if self.bucket is not None and not self.bucket.try_take():
            self.breaker.on_neutral()
            return "requests-per-minute limit reached"
        self.inflight += 1
        return None

    def release_unused(self) -> None:
        """An admitted call that was never sent (no shared token): frees its slot, says nothing of health."""
        self.inflight -= 1
        self.breaker.on_neutral()

    def release(self, error: BaseException | None) -> None:
        """Close one admitted call with its outcome (None for success)."""
        self.inflight -= 1
        if error is None:
            self.breaker.on_success()
        elif isinstance(error, BackendAuthError):
            self.breaker.open_for(self.breaker.config.auth_cooldown_s, f"auth/account error: {error.message}")
        elif isinstance(error, BackendRateLimited):
            self.breaker.on_neutral()
            if error.retry_after_s:
                self.breaker.open_for(error.retry_after_s, "rate limited by the provider (Retry-After)")
        elif isinstance(error, BackendRequestRejected | BackendReleased) or \
                not isinstance(error, BackendError | TimeoutError):
            self.breaker.on_neutral()  # the request's fault, or cancelled: says nothing of health
        else:
            self.breaker.on_failure(type(error).__name__)
