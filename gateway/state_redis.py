"""The StateStore over Redis, shared by every replica: keys under imagegw:<namespace>:, read-modify-write
in Lua. While Redis is unreachable a MemoryStore stands in for samples and ejections, and spend stays on
this replica's ledger (gateway/ledger.py), written back idempotently once Redis answers again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable

from . import tasks
from .ledger import SpendLedger
from .state import MemoryStore, Reservation, StateStore, period_keys

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


_RESERVE = """
-- KEYS: the tenant's day hash, month hash, the month's tenant set. One field per replica, SET to that
-- replica's total (with a sequence number: a late write never undoes a newer one), so re-sending is
-- idempotent. ARGV: replica, seq, my day total, my month total, daily limit, monthly limit (-1: none),
-- check (1: refuse if a limit would be passed), tenant.
local me, seq = ARGV[1], tonumber(ARGV[2])
local function others(key)
  local vals, total = redis.call('HGETALL', key), 0
  for i = 1, #vals, 2 do
    if vals[i] ~= me and string.sub(vals[i], -4) ~= ':seq' then total = total + tonumber(vals[i + 1]) end
  end
  return total
end
local od, om = others(KEYS[1]), others(KEYS[2])
local day, month = tonumber(ARGV[3]), tonumber(ARGV[4])
local daily, monthly = tonumber(ARGV[5]), tonumber(ARGV[6])
local over = (daily >= 0 and od + day > daily + 1e-12) or (monthly >= 0 and om + month > monthly + 1e-12)
if ARGV[7] == '1' and over then
  return {0, tostring(od), tostring(om)}
end
for i, key in ipairs({KEYS[1], KEYS[2]}) do
  if seq > tonumber(redis.call('HGET', key, me .. ':seq') or '-1') then
    redis.call('HSET', key, me, ARGV[2 + i], me .. ':seq', ARGV[2])
  end
end
redis.call('EXPIRE', KEYS[1], 172800); redis.call('EXPIRE', KEYS[2], 3024000)
redis.call('SADD', KEYS[3], ARGV[8]); redis.call('EXPIRE', KEYS[3], 3024000)
return {1, tostring(od), tostring(om)}
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

# Release a flight lease only while it is still ours: one that expired may lead another replica's generation now.
_RELEASE_FLIGHT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore(StateStore):
    """The same operations over Redis; while Redis is unreachable a MemoryStore stands in for samples and
    ejections, and spend stays on this replica's ledger (gateway/ledger.py), written back idempotently."""

    def __init__(self, client, namespace: str = "default", max_samples: int = 1000, replica_id: str = "",
                 timeouts_before_outage: int = 3):
        self._redis = client
        self._ns = f"imagegw:{namespace}"
        self._max = max_samples
        self._local = MemoryStore(max_samples)
        self._reserve = client.register_script(_RESERVE)
        self._take = client.register_script(_TAKE_TOKEN)
        self._release = client.register_script(_RELEASE_FLIGHT)
        self.ledger = SpendLedger()
        self.replica_id = replica_id or "replica"
        self._calls = itertools.count()
        self.degraded = False
        self._timeouts = 0
        self._timeouts_before_outage = timeouts_before_outage  # a slow answer under load is not an outage
        self._tasks: list[asyncio.Task] = []

    @property
    def shared(self) -> bool:
        return not self.degraded

    def _k(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    async def _guard(self, op: Callable[[], Awaitable], fallback: Callable[[], Awaitable]):
        """Run op on Redis; on failure (or while degraded) answer from the local view. Only the sync loop's
        tick() probes a degraded Redis: requests never wait on a connect that will fail."""
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeout

        if self.degraded:
            return await fallback()
        try:
            result = await op()
            self._timeouts = 0
            return result
        except (RedisTimeout, TimeoutError):
            self._timeouts += 1
            if self._timeouts >= self._timeouts_before_outage:
                self._outage("timeouts")
            return await fallback()
        except (RedisError, OSError) as exc:
            self._outage(type(exc).__name__)
            return await fallback()

    def _outage(self, why: str) -> None:
        if not self.degraded:
            log.error("Redis unreachable (%s): serving on this replica's local view; spend kept on its ledger", why)
        self.degraded = True

    async def tick(self, now: float) -> None:
        """Once per sync interval: write this replica's changed spend (idempotent: totals, set), and its
        heartbeat; while degraded, probe Redis and, once it answers, write every current total back (a Redis
        that restarted empty gets them again)."""
        day, month = period_keys(now)
        if self.degraded:
            try:
                await self._redis.ping()
            except Exception:
                return
            self.ledger.dirty.update(self.ledger.current((day, month)))
        try:
            await self._write_spend(day, month, now)
            if self.degraded:
                self.degraded, self._timeouts = False, 0
                self.ledger.outage_over()
                log.warning("Redis reachable again; this replica's spend written back (%d totals)",
                            len(self.ledger.current((day, month))))
        except Exception as exc:
            if not self.degraded:
                self._outage(type(exc).__name__)

    async def _write_spend(self, day: str, month: str, now: float) -> None:
        dirty, self.ledger.dirty = self.ledger.dirty, set()
        tenants = sorted({t for t, p in dirty if p in (day, month)})
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._k("replicas"), self.replica_id, now)
                pipe.hgetall(self._k("replicas"))
                for tenant in tenants:
                    await self._reserve_call(pipe, tenant, day, month, None, None, check=False)  # queued
                rows = await pipe.execute()
        except BaseException:
            self.ledger.dirty |= dirty  # written next time
            raise
        alive = [float(ts) for ts in rows[1].values() if float(ts) > now - 30]
        self.ledger.replicas = max(1, len(alive))
        for tenant, (_, od, om) in zip(tenants, rows[2:], strict=True):
            self.ledger.others[(tenant, day)], self.ledger.others[(tenant, month)] = float(od), float(om)

    def _reserve_call(self, runner, tenant, day, month, daily, monthly, check: bool):
        mine = self.ledger.mine
        return self._reserve(
            keys=[self._k("spend", tenant, day), self._k("spend", tenant, month), self._k("tenants", month)],
            args=[self.replica_id, self.ledger.seq(), mine.get((tenant, day), 0.0), mine.get((tenant, month), 0.0),
                  -1 if daily is None else daily, -1 if monthly is None else monthly, 1 if check else 0, tenant],
            client=runner)

    def seed_spend(self, totals):
        self.ledger.seed(totals)

    async def record_spend(self, tenant, usd, now):
        if usd:
            self.ledger.add(tenant, period_keys(now), usd)  # written by the next tick

    async def reserve(self, tenant, amount, daily, monthly, now):
        day, month = period_keys(now)
        self.ledger.add(tenant, (day, month), amount)  # optimistic; taken back if refused

        async def op():
            ok, od, om = await self._reserve_call(self._redis, tenant, day, month, daily, monthly, check=True)
            self.ledger.others[(tenant, day)], self.ledger.others[(tenant, month)] = float(od), float(om)
            self.ledger.dirty -= {(tenant, day), (tenant, month)}
            return bool(int(ok))

        async def offline():
            return self.ledger.allows_offline(tenant, {day: daily, month: monthly}, amount)

        if not await self._guard(op, offline):
            self.ledger.add(tenant, (day, month), -amount)
            return None, self.ledger.total((tenant, day)), self.ledger.total((tenant, month))
        return (Reservation(tenant, amount, day, month), self.ledger.total((tenant, day)),
                self.ledger.total((tenant, month)))

    async def settle(self, reservation, actual):
        delta = actual - reservation.amount
        if delta:
            self.ledger.add(reservation.tenant, (reservation.day, reservation.month), delta)  # next tick writes it

    async def spend(self, now):
        day, month = period_keys(now)

        async def op():
            tenants = sorted(t.decode() if isinstance(t, bytes) else t
                             for t in await self._redis.smembers(self._k("tenants", month)))
            tenants = sorted({*tenants, *(t for t, p in self.ledger.mine if p == month)})
            async with self._redis.pipeline(transaction=False) as pipe:
                for t in tenants:
                    pipe.hgetall(self._k("spend", t, day))
                    pipe.hgetall(self._k("spend", t, month))
                rows = await pipe.execute()
            out = {}
            for i, t in enumerate(tenants):
                for period, row in ((day, rows[2 * i]), (month, rows[2 * i + 1])):
                    others = sum(float(v) for f, v in row.items()
                                 if not _text(f).endswith(":seq") and _text(f) != self.replica_id)
                    self.ledger.others[(t, period)] = others
                out[t] = {"day": self.ledger.total((t, day)), "month": self.ledger.total((t, month))}
            return out

        async def offline():
            tenants = {t for t, p in self.ledger.mine if p == month} | {t for t, p in self.ledger.others if p == month}
            return {t: {"day": self.ledger.total((t, day)), "month": self.ledger.total((t, month))}
                    for t in sorted(tenants)}

        return await self._guard(op, offline)

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
            value = f"{self.replica_id}\x1f{reason}"  # who ejected it: a replica never takes its own back
            await self._redis.set(self._k("ejected", backend), value, px=max(1, int(seconds * 1000)))

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
                    origin, _, text = _text(reason).rpartition("\x1f")
                    if origin != self.replica_id:
                        out[b] = (ttl / 1000, text)
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

    async def claim_flight(self, key, ttl_s):
        async def op():
            return bool(await self._redis.set(self._k("flight", key), self.replica_id, nx=True,
                                              px=max(1, int(ttl_s * 1000))))

        async def offline():
            return None  # each replica makes its own meanwhile

        return await self._guard(op, offline)

    async def flight_held(self, key):
        async def op():
            return bool(await self._redis.exists(self._k("flight", key)))

        async def offline():
            return False

        return await self._guard(op, offline)

    async def release_flight(self, key):
        async def op():
            await self._release(keys=[self._k("flight", key)], args=[self.replica_id])

        async def offline():
            return None  # the lease expires on its own

        await self._guard(op, offline)

    async def close(self):
        for task in self._tasks:
            await tasks.stop(task)  # pubsub can swallow a cancellation like any Redis call
        with contextlib.suppress(Exception):
            await self._redis.aclose()
