"""This replica's own spend per tenant and period: the record that shared totals are rebuilt from.

Across replicas a tenant's spend is one Redis hash per period with one field per replica, *set* to that
replica's total (never incremented), with a sequence number so a late write cannot undo a newer one.
Re-sending is therefore idempotent: after an outage, or a Redis restart that lost everything, each
replica writes its totals again and the sum is right to the cent. While Redis is away, a replica may
spend only its share (1/N, N the replicas last seen) of what the budget had left, so a fleet of N
replicas overspends by at most N requests' prices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["SpendLedger"]

Key = tuple[str, str]  # (tenant, period: "YYYY-MM-DD" or "YYYY-MM")


@dataclass
class SpendLedger:
    mine: dict[Key, float] = field(default_factory=dict)  # this replica's totals, reservations in flight included
    others: dict[Key, float] = field(default_factory=dict)  # every other replica's, as last read
    dirty: set[Key] = field(default_factory=set)  # changed since last written to Redis
    replicas: int = 1  # replicas seen alive at the last heartbeat
    _outage_base: dict[Key, float] = field(default_factory=dict)  # mine when the outage began, per key
    _seq: int = 0

    def seq(self) -> int:
        """Strictly increasing, also across restarts of a replica that keeps its id (wall-clock based)."""
        self._seq = max(self._seq + 1, time.time_ns())
        return self._seq

    def add(self, tenant: str, periods: tuple[str, ...], usd: float) -> None:
        for period in periods:
            key = (tenant, period)
            self.mine[key] = self.mine.get(key, 0.0) + usd
            self.dirty.add(key)

    def total(self, key: Key) -> float:
        return self.others.get(key, 0.0) + self.mine.get(key, 0.0)

    def allows_offline(self, tenant: str, limits: dict[str, float | None], amount: float) -> bool:
        """While Redis is away: within this replica's share of what each budget had left when it went."""
        for period, limit in limits.items():
            if limit is None:
                continue
            key = (tenant, period)
            base = self._outage_base.setdefault(key, self.mine.get(key, 0.0))
            left = limit - self.others.get(key, 0.0) - base
            if self.mine.get(key, 0.0) - base + amount > left / max(1, self.replicas) + 1e-12:
                return False
        return True

    def outage_over(self) -> None:
        self._outage_base.clear()

    def current(self, periods: tuple[str, ...]) -> dict[Key, float]:
        """This replica's totals for the given periods (what a republish writes)."""
        return {k: v for k, v in self.mine.items() if k[1] in periods}

    def seed(self, totals: dict[Key, float]) -> None:
        """Start from the replica's own durable record (its audit log), e.g. after a restart."""
        for key, usd in totals.items():
            self.mine[key] = usd
            self.dirty.add(key)
