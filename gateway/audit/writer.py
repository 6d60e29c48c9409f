"""The batching writer, the same for every store: `submit()` never blocks and never drops; a background task
drains what is queued in batches into a sink (SQLite, Postgres); a batch the sink could not take stays queued and
is tried again; `close()` flushes everything still queued before the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

__all__ = ["AuditLog", "Sink"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where batches go. `write` takes one batch as one transaction (all or nothing)."""

    name: str
    shared: bool  # every replica writes to it (records are told apart by their replica id)

    async def open(self) -> None: ...

    async def write(self, records: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...

    def reader(self): ...


class AuditLog:
    """Batched, background writer for audit records (plain dicts)."""

    def __init__(self, sink: Sink, *, batch_size: int = 256, flush_interval_s: float = 0.2,
                 retry_interval_s: float = 1.0):
        self.sink = sink
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._retry_interval_s = retry_interval_s
        # A plain list and one event: the writer wakes once per flush interval, not once per record (an
        # asyncio.Queue woke it for every put: a task step per request on the event loop).
        self._pending: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._in_flight: tuple[list[dict[str, Any]], asyncio.Future] | None = None
        self.stamp: dict[str, Any] = {}  # fields added to every record (the replica's id)
        self.written = 0
        self.failures = 0  # batches a sink refused (and that were queued again)

    @property
    def reader(self):
        """Reads what this log wrote (the admin API; records appear within a flush interval)."""
        return self.sink.reader()

    async def start(self) -> None:
        await self.sink.open()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def submit(self, record: dict[str, Any]) -> None:
        """Queue one record; returns at once."""
        if self.stamp:
            record.update(self.stamp)
        self._pending.append(record)
        if len(self._pending) == 1:
            self._arrived.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if len(self._pending) < self._batch_size:
                await asyncio.sleep(self._flush_interval_s)  # let a batch gather
            batch = self._pending[:self._batch_size]
            del self._pending[:len(batch)]
            if not self._pending:
                self._arrived.clear()
            await self._write(batch)

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        # Shielded: close() may cancel the writer mid-batch; the write finishes and close() waits for it.
        self._in_flight = batch, asyncio.ensure_future(self.sink.write(batch))
        try:
            await asyncio.shield(self._in_flight[1])
            self.written += len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Keep the records: put them back and let the next round retry (a database away for a while).
            self.failures += 1
            log.error("audit write to %s failed (%s: %s); %d records queued again, %d queued in all",
                      self.sink.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", len(batch),
                      len(batch) + len(self._pending))
            self._pending[:0] = batch
            self._arrived.set()
            await asyncio.sleep(self._retry_interval_s)
        finally:
            if self._in_flight is not None and self._in_flight[1].done():
                self._in_flight = None

    async def close(self) -> None:
        """Stop the writer and flush every queued record (a batch being written is waited for)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        remaining, self._pending = self._pending, []
        if self._in_flight is not None:
            batch, write = self._in_flight
            self._in_flight = None
            try:
                await write
                self.written += len(batch)
            except Exception:
                remaining = batch + remaining
        try:
            for start in range(0, len(remaining), self._batch_size):
                await self.sink.write(remaining[start:start + self._batch_size])
                self.written += len(remaining[start:start + self._batch_size])
        except Exception as exc:
            log.error("audit: %d records could not be written at shutdown (%s: %s)", len(remaining),
                      type(exc).__name__, exc)
        finally:
            await self.sink.close()
