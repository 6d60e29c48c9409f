"""Per-backend admission: outlier ejection (broken), pacing (slow down) and a concurrency cap.

The two signals never mix: a 429 paces the backend (gateway/pacing.py) and says nothing of its health;
5xx, timeouts and malformed replies feed its ejector (gateway/ejection.py); a job that timed out still queued in
the local pool (a backlog, a worker restarting) does not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from backends.errors import (
    BackendAuthError,
    BackendError,
    BackendPaced,
    BackendQueueTimeout,
    BackendRateLimited,
    BackendReleased,
    BackendRequestRejected,
)
from policies.types import Health

from .ejection import EjectionCap, EjectionConfig, Ejector
from .pacing import Pacer

__all__ = ["BackendGuard"]


class BackendGuard:
    """Says whether a backend may take a call now, and learns from each call's outcome."""

    def __init__(self, name: str = "backend", *, ejection: EjectionConfig = EjectionConfig(),
                 max_concurrency: int | None = None, requests_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, cap: EjectionCap | None = None):
        self.name = name
        self.ejector = Ejector(name, ejection, clock, cap)
        self.pacer = Pacer(name, requests_per_minute, clock, sleep)
        self.max_concurrency = max_concurrency
        self.inflight = 0
        self._clock = clock

    def health(self) -> tuple[Health, str]:
        """For the snapshot: ejected or recovering, or at its concurrency cap, else OK (pacing is a wait)."""
        health = self.ejector.health()
        if health is Health.OPEN:
            return health, f"ejected for {self.ejector.until - self._clock():.0f} s more: {self.ejector.reason}"
        if health is Health.HALF_OPEN:
            return health, f"recovering ({self.ejector.share:.0%} of calls): {self.ejector.reason}"
        if self.max_concurrency is not None and self.inflight >= self.max_concurrency:
            return Health.OPEN, f"at its concurrency cap ({self.max_concurrency})"
        return Health.OK, ""

    def wait_ms(self) -> float:
        """How long a call would wait for its turn now (pacing), for predictions."""
        return self.pacer.wait_s() * 1000

    def admit(self, request_id: str | None = None, last_resort: bool = False) -> str | None:
        """Take a slot for one call; returns why not, or None when admitted (then call release())."""
        if self.max_concurrency is not None and self.inflight >= self.max_concurrency:
            return "concurrency cap reached"
        if not self.ejector.admit(request_id, last_resort):
            return f"{self.ejector.state}: {self.ejector.reason}"
        self.inflight += 1
        return None

    def release(self, error: BaseException | None, request_id: str | None = None) -> None:
        """Close one admitted call with its outcome (None for success)."""
        self.inflight -= 1
        if error is None:
            self.ejector.on_success()
            self.pacer.on_success()
        elif isinstance(error, BackendPaced):
            pass  # held back by our own pacing: nothing was sent
        elif isinstance(error, BackendRateLimited):
            self.pacer.on_rate_limited(error.retry_after_s)  # slow down, not broken
        elif isinstance(error, BackendAuthError):
            # the status, not the provider's text: reasons show on status pages
            self.ejector.eject(f"auth/account error (HTTP {error.status or '?'})", request_id,
                               seconds=self.ejector.config.auth_ejection_s)
        elif isinstance(error, BackendRequestRejected | BackendReleased | BackendQueueTimeout) or \
                not isinstance(error, BackendError | TimeoutError):
            pass  # the request's fault, a busy queue, or cancelled: says nothing of health
        else:
            self.ejector.on_failure(error.kind if isinstance(error, BackendError) else type(error).__name__,
                                    request_id)

    def status(self, wall_now: float | None = None) -> dict:
        """State, reason and until when (wall-clock seconds), for /v1/backends."""
        wall_now = time.time() if wall_now is None else wall_now
        now = self._clock()
        e, p = self.ejector, self.pacer
        out: dict = {"state": e.state, "share": round(e.share, 3), "inflight": self.inflight}
        if e.state != "serving" or e.reason:
            out["reason"] = e.reason
        if e.until is not None:
            out["until"] = round(wall_now + e.until - now, 3)
        wait = p.wait_s()
        out["pacing"] = {"paced": wait > 0, "requests_per_minute": p.per_minute, "calls": p.calls}
        if wait > 0:
            out["pacing"].update(reason=p.pause_reason if p.paused_until > now else "requests-per-minute window",
                                 until=round(wall_now + wait, 3))
        return out
