"""Runs accepted jobs: each replica claims queued jobs from the shared store under a lease, runs each through
the same path as a synchronous request (routing, budgets, dispatch, audit), renews the lease while it runs and
records the outcome. A replica that dies stops renewing: its jobs are claimed again by any replica once the lease
runs out (run at most once more); one that shuts down puts its jobs back in the queue. A cancelled job's task is
stopped at the next renewal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..errors import GatewayError, error_body
from ..service import GenerationService, RequestContext
from .store import Claimed, JobStore

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)

MAX_RUNS = 2  # a job whose runner was lost this many times fails instead of running again


class JobRunner:
    def __init__(self, store: JobStore, service: GenerationService, owner: str, *, concurrency: int,
                 poll_interval_s: float, webhooks=None, base_url: str = ""):
        self._store, self._service, self._owner = store, service, owner
        self._concurrency, self._poll_s = concurrency, poll_interval_s
        self._webhooks = webhooks
        self._base_url = base_url
        self._running: dict[str, asyncio.Task] = {}
        self._cancelled: set[str] = set()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """A job was just accepted here: look for work now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="job-runner")

    async def _loop(self) -> None:
        while True:
            try:
                await self._fill()
                if self._webhooks is not None:
                    await self._webhooks.send_due(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store away for a moment: jobs wait, nothing is lost
                log.warning("job runner: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)

    async def _fill(self) -> None:
        while len(self._running) < self._concurrency:
            claimed = await self._store.claim(self._owner, time.time())
            if claimed is None:
                return
            self._running[claimed.id] = asyncio.create_task(self._run(claimed), name=f"job-{claimed.id}")

    async def _run(self, job: Claimed) -> None:
        renewing = asyncio.create_task(self._renew(job.id))
        try:
            await self._execute(job)
        except asyncio.CancelledError:
            if job.id not in self._cancelled:  # shutting down: the job goes back to the queue, not lost
                with contextlib.suppress(Exception):
                    await self._store.requeue(job.id, self._owner, time.time())
                raise
        finally:
            renewing.cancel()
            self._running.pop(job.id, None)
            self._cancelled.discard(job.id)

    async def _execute(self, job: Claimed) -> None:
        finish = self._store.finish
        if job.runs > MAX_RUNS:
            await finish(job.id, self._owner, "failed", time.time(), error=error_body(
                f"the job's runner was lost {job.runs - 1} times while running it; it is not run again",
                "server_error", code="job_lost"))
            return
        ctx = RequestContext(tenant=job.tenant, base_url_of=lambda: self._base_url)
        ctx.received_wall = job.created_at  # the SLA counts from acceptance, queueing included
        ctx.received_mono = time.monotonic() - max(0.0, time.time() - job.created_at)
        hold = self._service.job_hold_s(job.body, ctx)
        if hold > 0:  # the pool is busy and the deadline allows: wait in the store, not in the pool's queue
            await self._store.hold(job.id, self._owner, time.time() + hold, time.time())
            return
        try:
            served = await self._service.generate(job.body, ctx)
        except GatewayError as exc:
            await finish(job.id, self._owner, "failed", time.time(), error=exc.body(), decision_id=ctx.id)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # already logged and audited by the service
            await finish(job.id, self._owner, "failed", time.time(), decision_id=ctx.id,
                         error=error_body(f"internal error ({type(exc).__name__})", "server_error",
                                          code="internal_error"))
            return
        await finish(job.id, self._owner, "succeeded", time.time(), result=served.body["data"],
                     backend=served.headers.get("x-gateway-backend"),
                     cost_usd=float(served.headers.get("x-gateway-cost-usd") or 0.0), decision_id=ctx.id)

    async def _renew(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self._store.lease_s / 3)
            try:
                status = await self._store.renew(job_id, self._owner, time.time())
            except Exception:
                continue  # the store away: keep running; the lease has slack for two misses
            if status != "running":  # cancelled, or no longer ours
                self._cancelled.add(job_id)
                task = self._running.get(job_id)
                if task is not None:
                    task.cancel()
                return

    async def close(self) -> None:
        """Stop claiming; jobs still running go back to the queue (another replica, or this one restarted,
        runs them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
