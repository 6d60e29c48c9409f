"""Outlier ejection for one backend, as Envoy ejects hosts: "broken" signals only (5xx, timeouts,
malformed replies, error rate), never "slow down" (429s pace the backend instead: gateway/pacing.py).

    serving --(consecutive failures | error rate)--> ejected (base x n-th ejection, capped)
    ejected --(time passes)--> recovering: a share of calls goes through, doubling per success
    recovering --(share reaches 1)--> serving;  --(two failures in a row)--> ejected again, for longer

A cap (`EjectionCap`) keeps a share of each tier's candidates in service: the last one is never ejected.
A request's own retry is never refused by an ejection its own previous attempt caused.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from policies.types import Health

__all__ = ["EjectionCap", "EjectionConfig", "Ejector"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EjectionConfig:
    consecutive_failures: int = 5
    error_rate: float = 0.5  # over the window, once min_requests were seen
    window_s: float = 60.0
    min_requests: int = 10
    base_ejection_s: float = 10.0  # the n-th ejection in a row lasts n times this
    max_ejection_s: float = 300.0
    max_ejected_percent: float = 50.0  # of a tier's candidates at once; never the last one
    recovery_share: float = 0.25  # of calls let through after an ejection; doubles with each success
    auth_ejection_s: float = 300.0  # bad key or account: nothing works until ops act


class EjectionCap:
    """Which backends may be ejected now: at most `max_percent` of each group (a tier's candidates), at least
    one where a group has two or more, never a group's last one. `groups` is asked at each ejection."""

    def __init__(self, max_percent: float = 50.0, groups: Callable[[], Iterable[frozenset[str]]] = tuple):
        self.max_percent = max_percent
        self.groups = groups
        self.ejectors: dict[str, Ejector] = {}

    def allows(self, name: str) -> bool:
        ejected = {n for n, e in self.ejectors.items() if e.state == "ejected"}
        for group in self.groups():
            if name not in group:
                continue
            after = len((ejected & group) | {name})
            if after >= len(group) or after > max(1, int(len(group) * self.max_percent / 100)):
                return False
        return True


class Ejector:
    """One backend's ejection state, fed every call's outcome; `admit()` says whether a call may go."""

    def __init__(self, name: str, config: EjectionConfig = EjectionConfig(),
                 clock: Callable[[], float] = time.monotonic, cap: EjectionCap | None = None):
        self.name = name
        self.config = config
        self._clock = clock
        self._cap = cap
        if cap is not None:
            cap.ejectors[name] = self
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._consecutive = 0
        self._until = 0.0  # ejected until (monotonic)
        self._ejected = False  # ejected or recovering
        self._share = 1.0
        self._credit = 0.0
        self._count = 0  # ejections in a row (decays after a long healthy spell)
        self._last_recovered = float("-inf")
        self._cause: str | None = None  # the request whose failure ejected it
        self.reason = ""
        self.on_eject: Callable[[float, str], None] | None = None  # told when this replica ejects it

    @property
    def state(self) -> str:
        if not self._ejected:
            return "serving"
        return "ejected" if self._clock() < self._until else "recovering"

    @property
    def until(self) -> float | None:
        """Monotonic time the ejection ends, while ejected."""
        return self._until if self.state == "ejected" else None

    @property
    def share(self) -> float:
        """Share of calls let through now (1 serving, 0 ejected)."""
        state = self.state
        return 1.0 if state == "serving" else 0.0 if state == "ejected" else self._share

    def health(self) -> Health:
        return {"serving": Health.OK, "ejected": Health.OPEN, "recovering": Health.HALF_OPEN}[self.state]

    def admit(self, request_id: str | None = None, last_resort: bool = False) -> bool:
        """May this call go? Recovering lets `share` of calls through (and any call with nowhere else to go);
        a request's own retry always passes an ejection it caused."""
        state = self.state
        if state == "serving" or (request_id is not None and request_id == self._cause):
            return True
        if state == "ejected":
            return False
        if last_resort:
            return True
        self._credit += self._share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False

    def on_success(self) -> None:
        self._record(True)
        self._consecutive = 0
        if self._ejected and self.state == "recovering":
            self._share = min(1.0, self._share * 2)
            if self._share >= 1.0:
                self._recovered()

    def on_failure(self, kind: str, request_id: str | None = None) -> None:
        self._record(False)
        self._consecutive += 1
        state = self.state
        if state == "ejected":
            return
        if state == "recovering":
            # One failure in recovery halves the share let through; two in a row mean it is still broken.
            self._share = max(self.config.recovery_share, self._share / 2)
            if self._consecutive >= 2:
                self.eject(f"failed again while recovering ({kind})", request_id)
        elif self._consecutive >= self.config.consecutive_failures:
            self.eject(f"{self._consecutive} consecutive failures ({kind})", request_id)
        elif self._error_rate_exceeded():
            self.eject(f"error rate over {self.config.error_rate:.0%} in {self.config.window_s:.0f} s ({kind})",
                       request_id)

    def eject(self, reason: str, request_id: str | None = None, seconds: float | None = None) -> bool:
        """Take it out of rotation (growing with repeated ejections, unless `seconds` is given); False when the
        cap keeps it in."""
        if self._cap is not None and self.state != "ejected" and not self._cap.allows(self.name):
            if not self.reason.startswith("kept in"):
                log.warning("backend %s would be ejected (%s) but the ejection cap keeps it in service",
                            self.name, reason)
            self.reason = f"kept in service by the ejection cap: {reason}"
            return False
        now = self._clock()
        if seconds is None:
            if not self._ejected and now - self._last_recovered > self.config.max_ejection_s:
                self._count = 0  # a long healthy spell since it last came back: start over
            self._count += 1
            seconds = min(self.config.base_ejection_s * self._count, self.config.max_ejection_s)
        self._set_ejected(now + seconds, reason, request_id)
        log.warning("backend %s ejected for %.0f s: %s", self.name, seconds, reason)
        if self.on_eject is not None:
            self.on_eject(seconds, reason)
        return True

    def eject_shared(self, seconds: float, reason: str) -> None:
        """An ejection another replica made (not re-announced, not counted here)."""
        until = self._clock() + seconds
        if self.state == "ejected" and until <= self._until:
            return
        if self.state != "ejected":
            log.warning("backend %s ejected for %.0f s by another replica: %s", self.name, seconds, reason)
        self._set_ejected(until, f"{reason} (shared)", None)

    def _set_ejected(self, until: float, reason: str, cause: str | None) -> None:
        self._ejected, self._until, self.reason, self._cause = True, until, reason, cause
        self._share, self._credit = self.config.recovery_share, 0.0
        self._consecutive = 0
        self._outcomes.clear()

    def _recovered(self) -> None:
        self._ejected, self._share, self.reason, self._cause = False, 1.0, "", None
        self._last_recovered = self._clock()
        log.warning("backend %s back in full service", self.name)

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
