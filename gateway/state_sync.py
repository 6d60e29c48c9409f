"""Keeps this replica's in-memory view in step with the shared StateStore, off the request path.

Pushes: each finished request's attempts (latency samples) and every ejection this
replica makes. Pulls, every `interval_s`: everyone's samples (into OutcomeStats,
which the snapshot reads), ejections other replicas made (applied locally), and
per-tenant spend (for metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from . import tasks
from .guard import BackendGuard
from .state import StateStore
from .stats import OutcomeStats

__all__ = ["StateSync"]

log = logging.getLogger(__name__)


class StateSync:
    def __init__(self, store: StateStore, stats: OutcomeStats, guards: Mapping[str, BackendGuard],
                 interval_s: float = 1.0):
        self.store = store
        self.stats = stats
        self.guards = guards
        self.interval_s = interval_s
        self.spend: dict[str, dict[str, float]] = {}  # last pulled per-tenant spend (for metrics)
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()
        self.pending_within_s = 5.0  # how long close() lets one-shot store calls land before stopping them
        self._outcomes: list[tuple[str, float, bool, float]] = []
        for name, guard in guards.items():
            guard.ejector.on_eject = lambda seconds, reason, name=name: self.spawn(
                store.eject(name, seconds, reason))

    def spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (a test driving the ejector synchronously)
            coro.close()
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def observe_record(self, record: dict) -> None:
        """Observer: queue this request's attempt outcomes; the sync loop shares them in one round trip
        per interval (a store call per request cost a Redis round trip on the request's event loop)."""
        now = time.time()
        self._outcomes.extend((backend, latency_ms, ok, now) for backend, latency_ms, ok in self.stats.attempts(record))

    async def flush(self) -> None:
        if self._outcomes:
            outcomes, self._outcomes = self._outcomes, []
            await self.store.add_outcomes(outcomes)

    async def pull(self) -> None:
        names = list(self.guards)
        for backend, samples in (await self.store.outcomes(names)).items():
            if samples:
                self.stats.replace(backend, samples)
        for backend, (seconds, reason) in (await self.store.ejections(names)).items():
            self.guards[backend].ejector.eject_shared(seconds, reason)
        self.spend = await self.store.spend(time.time())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="state-sync")

    async def _loop(self) -> None:
        while True:
            try:
                await self.store.tick(time.time())
                await self.flush()
                await self.pull()
            except Exception:
                log.exception("state sync failed")
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        await tasks.stop(self._task)  # a cancellation a store call swallowed must not hang the shutdown
        if self._pending:  # one-shot store calls (ejections): they land unless Redis hangs past the bound
            _, late = await asyncio.wait(set(self._pending), timeout=self.pending_within_s)
            # stopped together: each that absorbs cancellation may take its 1 s, in parallel, not one after another
            await asyncio.gather(*(tasks.stop(task, within_s=1.0) for task in late))
        with contextlib.suppress(Exception):
            await self.flush()
        with contextlib.suppress(Exception):
            await self.store.tick(time.time())  # the last spend written back
