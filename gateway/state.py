"""Live state shared by gateway replicas: spend and budget reservations, outcome samples,
ejected backends, requests-per-minute windows, and policy changes.

`MemoryStore` is the embedded default (one replica). `RedisStore` shares it all
through Redis (keys namespaced; read-modify-write atomic in Lua); when Redis is
unreachable it keeps serving on its local view, says so (`degraded`), and folds
the spend it accumulated meanwhile back in when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .pacing import RateWindow

__all__ = ["MemoryStore", "RedisStore", "Reservation", "StateStore", "period_keys"]

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
        """{backend: (seconds left, reason)} for backends some replica ejected."""

    @abstractmethod
    async def take_token(self, backend: str, per_minute: float) -> float | None:
        """A turn in the backend's requests-per-minute window (at most per_minute calls in any 60 s), shared
        by every replica: 0 when taken, else seconds until one frees; None when the store is unreachable."""

    async def publish_policy(self, payload: dict) -> None:  # noqa: B027 (optional hook)
        """Tell other replicas a policy was applied (no-op for one replica)."""

    async def subscribe_policy(self, on_message: Callable[[dict], Awaitable[None]]) -> None:  # noqa: B027
        """Call on_message for every policy another replica applies (no-op for one replica)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""


class MemoryStore(StateStore):
    def __init__(self, max_samples: int = 1000):
        self._windows: dict[str, RateWindow] = {}
        self._spend: dict[tuple[str, str], float] = {}
        self._samples: dict[str, list[tuple[float, float, bool]]] = {}
        self._breakers: dict[str, tuple[float, str]] = {}
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

    async def add_outcomes(self, outcomes):
        for backend, latency_ms, ok, at in outcomes:
            samples = self._samples.setdefault(backend, [])
            samples.append((at, latency_ms, ok))
            del samples[: -self._max]

    async def outcomes(self, backends):
        return {b: list(self._samples.get(b, [])) for b in backends}

    async def eject(self, backend, seconds, reason):
        self._breakers[backend] = (time.monotonic() + seconds, reason)

    async def take_token(self, backend, per_minute):
        window = self._windows.get(backend)
        if window is None or window.limit != max(1, int(per_minute)):
            window = self._windows[backend] = RateWindow(per_minute)
        return window.take()

    async def ejections(self, backends):
        now = time.monotonic()
        return {b: (until - now, reason) for b, (until, reason) in self._breakers.items()
                if b in backends and until > now}


_RESERVE = """
local day = tonumber(redis.call('GET', KEYS[1]) or '0')
local month = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[1])
local daily, monthly = tonumber(ARGV[2]), tonumber(ARGV[3])
if (daily >= 0 and day + amount > daily) or (monthly >= 0 and month + amount > monthly) then
  return {0, tostring(day), tostring(month)}
end
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[1], 172800)
redis.call('INCRBYFLOAT', KEYS[2], ARGV[1]); redis.call('EXPIRE', KEYS[2], 3024000)
redis.call('SADD', KEYS[3], ARGV[4]); redis.call('EXPIRE', KEYS[3], 3024000)
return {1, tostring(day + amount), tostring(month + amount)}
"""


_TAKE_TOKEN = """
-- A sliding log: at most ARGV[1] calls in any 60 s, every replica's calls in one sorted set.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local limit = math.max(1, math.floor(tonumber(ARGV[1])))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, now_parts[1] .. now_parts[2] .. ':' .. ARGV[2])
  redis.call('EXPIRE', KEYS[1], 120)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + 60 - now)
"""


class RedisStore(StateStore):
    """The same operations over Redis; a MemoryStore stands in while Redis is unreachable."""

    def __init__(self, client, namespace: str = "default", max_samples: int = 1000, replica_id: str = ""):
        self._redis = client
        self._ns = f"imagegw:{namespace}"
        self._max = max_samples
        self._local = MemoryStore(max_samples)
        self._reserve = client.register_script(_RESERVE)
        self._take = client.register_script(_TAKE_TOKEN)
        self._offline_spend: dict[tuple[str, str, str], float] = {}  # (tenant, day, month) -> usd while degraded
        self.replica_id = replica_id
        self._calls = itertools.count()
        self.degraded = False
        self._tasks: list[asyncio.Task] = []

    def _k(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    async def _guard(self, op: Callable[[], Awaitable], fallback: Callable[[], Awaitable]):
        from redis.exceptions import RedisError

        try:
            if self.degraded:
                await self._catch_up()  # first fold in what this replica did meanwhile, then answer
            return await op()
        except (RedisError, OSError) as exc:
            if not self.degraded:
                log.error("Redis unreachable (%s): serving on this replica's local view", type(exc).__name__)
            self.degraded = True
            return await fallback()

    async def _catch_up(self) -> None:
        """Redis is back: add the spend this replica accumulated meanwhile."""
        pending = dict(self._offline_spend)
        async with self._redis.pipeline(transaction=True) as pipe:
            for (tenant, day, month), usd in pending.items():
                pipe.incrbyfloat(self._k("spend", tenant, day), usd)
                pipe.incrbyfloat(self._k("spend", tenant, month), usd)
                pipe.sadd(self._k("tenants", month), tenant)
            pipe.ping()  # a round trip even when there is nothing to fold in
            await pipe.execute()
        self._offline_spend.clear()  # only once Redis has it
        self.degraded = False
        log.warning("Redis reachable again; %d tenants' offline spend folded in", len(pending))

    async def reserve(self, tenant, amount, daily, monthly, now):
        day, month = period_keys(now)

        async def op():
            ok, d, m = await self._reserve(
                keys=[self._k("spend", tenant, day), self._k("spend", tenant, month), self._k("tenants", month)],
                args=[amount, -1 if daily is None else daily, -1 if monthly is None else monthly, tenant])
            reservation = Reservation(tenant, amount, day, month) if int(ok) else None
            return reservation, float(d), float(m)

        async def offline():
            result = await self._local.reserve(tenant, amount, daily, monthly, now)
            if result[0] is not None:
                key = (tenant, day, month)
                self._offline_spend[key] = self._offline_spend.get(key, 0.0) + amount
            return result

        return await self._guard(op, offline)

    async def settle(self, reservation, actual):
        delta = actual - reservation.amount
        if delta == 0:
            return

        async def op():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(self._k("spend", reservation.tenant, reservation.day), delta)
                pipe.incrbyfloat(self._k("spend", reservation.tenant, reservation.month), delta)
                await pipe.execute()

        async def offline():
            await self._local.settle(reservation, actual)
            key = (reservation.tenant, reservation.day, reservation.month)
            self._offline_spend[key] = self._offline_spend.get(key, 0.0) + delta

        await self._guard(op, offline)

    async def spend(self, now):
        day, month = period_keys(now)

        async def op():
            tenants = sorted(t.decode() if isinstance(t, bytes) else t
                             for t in await self._redis.smembers(self._k("tenants", month)))
            if not tenants:
                return {}
            keys = [self._k("spend", t, p) for t in tenants for p in (day, month)]
            values = await self._redis.mget(keys)
            return {t: {"day": float(values[2 * i] or 0), "month": float(values[2 * i + 1] or 0)}
                    for i, t in enumerate(tenants)}

        return await self._guard(op, lambda: self._local.spend(now))

    async def add_outcomes(self, outcomes):
        by_backend: dict[str, list[str]] = {}
        for backend, latency_ms, ok, at in outcomes:
            by_backend.setdefault(backend, []).append(json.dumps([at, latency_ms, ok]))

        async def op():
            async with self._redis.pipeline(transaction=False) as pipe:
                for backend, values in by_backend.items():
                    pipe.lpush(self._k("outcomes", backend), *values)
                    pipe.ltrim(self._k("outcomes", backend), 0, self._max - 1)
                await pipe.execute()

        await self._guard(op, lambda: self._local.add_outcomes(outcomes))

    async def outcomes(self, backends):
        async def op():
            async with self._redis.pipeline(transaction=False) as pipe:
                for b in backends:
                    pipe.lrange(self._k("outcomes", b), 0, -1)
                rows = await pipe.execute()
            return {b: [tuple(json.loads(x)) for x in reversed(r)] for b, r in zip(backends, rows, strict=True)}

        return await self._guard(op, lambda: self._local.outcomes(backends))

    async def eject(self, backend, seconds, reason):
        async def op():
            await self._redis.set(self._k("ejected", backend), reason, px=max(1, int(seconds * 1000)))

        await self._guard(op, lambda: self._local.eject(backend, seconds, reason))

    async def ejections(self, backends):
        async def op():
            async with self._redis.pipeline(transaction=False) as pipe:
                for b in backends:
                    pipe.get(self._k("ejected", b))
                    pipe.pttl(self._k("ejected", b))
                rows = await pipe.execute()
            out = {}
            for i, b in enumerate(backends):
                reason, ttl = rows[2 * i], rows[2 * i + 1]
                if reason is not None and ttl and ttl > 0:
                    out[b] = (ttl / 1000, reason.decode() if isinstance(reason, bytes) else reason)
            return out

        return await self._guard(op, lambda: self._local.ejections(backends))

    async def take_token(self, backend, per_minute):
        async def op():
            member = f"{self.replica_id}:{next(self._calls)}"  # unique even within one microsecond
            return float(await self._take(keys=[self._k("calls", backend)], args=[per_minute, member]))

        async def offline():
            return None  # the caller paces on its own share of the limit meanwhile

        return await self._guard(op, offline)

    async def publish_policy(self, payload):
        async def op():
            body = json.dumps({**payload, "origin": self.replica_id})
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._k("policy", "current"), body)
                pipe.rpush(self._k("policy", "history"), body)
                pipe.ltrim(self._k("policy", "history"), -500, -1)
                pipe.publish(self._k("policy", "changes"), body)
                await pipe.execute()

        async def offline():
            log.error("policy change not shared: Redis unreachable (other replicas keep their version)")

        await self._guard(op, offline)

    async def policy_history(self) -> list[dict]:
        """Every policy applied by any replica, oldest first (the last 500)."""

        async def op():
            return [json.loads(x) for x in await self._redis.lrange(self._k("policy", "history"), 0, -1)]

        async def offline():
            return []

        return await self._guard(op, offline)

    async def current_policy(self) -> dict | None:
        async def op():
            raw = await self._redis.get(self._k("policy", "current"))
            return json.loads(raw) if raw else None

        async def offline():
            return None

        return await self._guard(op, offline)

    async def subscribe_policy(self, on_message):
        self._tasks.append(asyncio.create_task(self._listen(on_message), name="policy-subscriber"))

    async def _listen(self, on_message) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self._k("policy", "changes"))
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    payload = json.loads(message["data"])
                    if payload.get("origin") != self.replica_id:
                        await on_message(payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: retry, the replica keeps serving meanwhile
                log.warning("policy subscription lost (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def close(self):
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._redis.aclose()
