"""Live state shared by gateway replicas: spend and budget reservations, outcome samples,
ejected backends, requests-per-minute windows, policy changes, and who makes identical requests' images.

`MemoryStore` is the embedded default (one replica). `RedisStore` (gateway/state_redis.py) shares it all
through Redis; when Redis is unreachable it keeps serving on its local view, says so (`degraded`), and
writes this replica's spend back, idempotently, when Redis returns.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .pacing import RateWindow

__all__ = ["MemoryStore", "Reservation", "StateStore", "period_keys"]

log = logging.getLogger(__name__)


def period_keys(now: float) -> tuple[str, str]:
    """UTC day and month the spend of `now` counts towards."""
    t = time.gmtime(now)
    return time.strftime("%Y-%m-%d", t), time.strftime("%Y-%m", t)


@dataclass(frozen=True, slots=True)
class Reservation:
    tenant: str
    amount: float
    day: str
    month: str


class StateStore(ABC):
    """Six small operations; everything else the gateway derives in memory."""

    degraded: bool = False

    @property
    def shared(self) -> bool:
        """Whether these figures are the fleet's (a reachable shared store) or this replica's alone."""
        return False

    @abstractmethod
    async def reserve(self, tenant: str, amount: float, daily: float | None, monthly: float | None,
                      now: float) -> tuple[Reservation | None, float, float]:
        """Atomically add `amount` to the tenant's day and month spend unless a limit would be passed.
        Returns (reservation or None, day spend, month spend)."""

    @abstractmethod
    async def settle(self, reservation: Reservation, actual: float) -> None:
        """Replace the reserved amount by what the request actually cost."""

    @abstractmethod
    async def spend(self, now: float) -> dict[str, dict[str, float]]:
        """{tenant: {"day": usd, "month": usd}} for the current periods."""

    @abstractmethod
    async def add_outcomes(self, outcomes: list[tuple[str, float, bool, float]]) -> None:
        """Record (backend, latency ms, ok, at) samples, several at once (one round trip)."""

    @abstractmethod
    async def outcomes(self, backends: list[str]) -> dict[str, list[tuple[float, float, bool]]]: ...

    @abstractmethod
    async def eject(self, backend: str, seconds: float, reason: str) -> None: ...

    @abstractmethod
    async def ejections(self, backends: list[str]) -> dict[str, tuple[float, str]]:
        """{backend: (seconds left, reason)} for backends some *other* replica ejected (never our own back)."""

    @abstractmethod
    async def take_token(self, backend: str, per_minute: float) -> float | None:
        """A turn in the backend's requests-per-minute window (at most per_minute calls in any 60 s), shared
        by every replica: 0 when taken, else seconds until one frees; None when the store is unreachable."""

    async def record_spend(self, tenant: str, usd: float, now: float) -> None:
        """Spend with no budget to reserve against (counted, never refused)."""
        if usd:
            reservation, _, _ = await self.reserve(tenant, 0.0, None, None, now)
            await self.settle(reservation, usd)

    def seed_spend(self, totals: dict[tuple[str, str], float]) -> None:  # noqa: B027 (optional hook)
        """Start from this replica's own durable record ({(tenant, period): usd}), e.g. its audit log."""

    async def tick(self, now: float) -> None:  # noqa: B027 (optional hook)
        """Called once per sync interval (write back, heartbeat, reconnect)."""

    async def publish_policy(self, payload: dict) -> None:  # noqa: B027 (optional hook)
        """Tell other replicas a policy was applied (no-op for one replica)."""

    async def subscribe_policy(self, on_message: Callable[[dict], Awaitable[None]]) -> None:  # noqa: B027
        """Call on_message for every policy another replica applies (no-op for one replica)."""

    async def claim_flight(self, key: str, ttl_s: float) -> bool | None:
        """Lead the fleet's generation of identical requests (`key`) for up to `ttl_s`: True when this replica
        leads, False when another does, None when there is no fleet to ask (one replica, or the store away)."""
        return None

    async def flight_held(self, key: str) -> bool:
        """Whether some replica still leads `key` (False when unknown: the caller then makes its own)."""
        return False

    async def release_flight(self, key: str) -> None:  # noqa: B027 (optional hook)
        """This replica's generation of `key` is done (landed in the cache, or failed)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


class MemoryStore(StateStore):
    def __init__(self, max_samples: int = 1000):
        self._windows: dict[str, RateWindow] = {}
        self._spend: dict[tuple[str, str], float] = {}
        self._samples: dict[str, list[tuple[float, float, bool]]] = {}
        self._max = max_samples

    async def reserve(self, tenant, amount, daily, monthly, now):
        day, month = period_keys(now)
        d, m = self._spend.get((tenant, day), 0.0), self._spend.get((tenant, month), 0.0)
        if (daily is not None and d + amount > daily) or (monthly is not None and m + amount > monthly):
            return None, d, m
        self._spend[(tenant, day)], self._spend[(tenant, month)] = d + amount, m + amount
        return Reservation(tenant, amount, day, month), d + amount, m + amount

    async def settle(self, reservation, actual):
        for period in (reservation.day, reservation.month):
            key = (reservation.tenant, period)
            self._spend[key] = self._spend.get(key, 0.0) + actual - reservation.amount

    async def spend(self, now):
        day, month = period_keys(now)
        out: dict[str, dict[str, float]] = {}
        for (tenant, period), usd in self._spend.items():
            if period in (day, month):
                out.setdefault(tenant, {"day": 0.0, "month": 0.0})["day" if period == day else "month"] = usd
        return out

    def seed_spend(self, totals):
        self._spend.update(totals)

    async def add_outcomes(self, outcomes):
        for backend, latency_ms, ok, at in outcomes:
            samples = self._samples.setdefault(backend, [])
            samples.append((at, latency_ms, ok))
            del samples[: -self._max]

    async def outcomes(self, backends):
        return {b: list(self._samples.get(b, [])) for b in backends}

    async def eject(self, backend, seconds, reason):
        pass  # one replica: nobody else to tell

    async def take_token(self, backend, per_minute):
        window = self._windows.get(backend)
        if window is None or window.limit != max(1, int(per_minute)):
            window = self._windows[backend] = RateWindow(per_minute)
        return window.take()

    async def ejections(self, backends):
        return {}  # one replica: its own ejections are already in its guards (no echo labelled "shared")
