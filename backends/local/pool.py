"""The local diffusion pool as a Backend: SLA-aware batches over one or more GPU workers.

Jobs wait in the `SLABatcher`; whenever a worker is free the scheduler asks it for
a batch and gives it to the least-loaded ready worker. Batch times feed the
throughput profile, which drives both batching and the policy's predictions.
A crashed worker's jobs are re-queued (while their deadlines allow) and the worker
restarted; while it restarts it counts as a worker busy until it is predicted back (as
long as its last start took), so the pool keeps taking work a short restart leaves time
for. `aclose()` drains what is queued and running before stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from policies.profile import ThroughputProfile
from policies.reservation import InflexibleArrivals, PoolArrival, PoolDemand, pool_job_hedge_pays
from policies.types import BackendKind, Health, PoolModel, SizeSupport

from ..errors import BackendQueueTimeout, BackendReleased, BackendTimeout, BackendTransientError, BackendUnavailable
from ..protocol import GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer
from .batcher import ArrivalRate, Batch, QueuedJob, SLABatcher
from .engine import EngineSpec
from .presets import PRESETS
from .workers import BatchRequest, WorkerCrashed, encoded, shape_key

__all__ = ["LocalPool", "PoolConfig", "load_profile"]

log = logging.getLogger(__name__)

# Pauses between tries to restart a crashed worker whose restart failed (then the last, for as long as it fails).
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str = "local"
    max_n: int = 10
    max_batch: int = 8
    max_wait_s: float = 0.1
    gpu_hour_usd: float = 2.0
    profile_path: Path | None = None  # where calibrate wrote it; observed batches are saved back on close
    run_sizes: tuple[int, ...] = ()  # the workers' compiled batch sizes (batches pad up to one of them)
    only_sizes: frozenset[tuple[int, int]] = frozenset()  # when set, the only (width, height) offered (warmed)
    # Compiled engines serve only what every ready worker has warmed: "aot" (a size's packages take every batch
    # size), "jit" (one graph per warmed size and batch size); "" serves any shape (eager).
    compiled: str = ""
    # Pre-emption: a request only the pool can serve in time (GenerationJob.preempts) queues apart and runs first,
    # on an idle worker or pausing a worker's batch of flexible work after its current denoising step; the policy
    # predicts both kinds of work so (PoolModel.preemptive). Workers that cannot pause (remote ones) are not paused.
    preempt: bool = False


def load_profile(path: Path | None, max_batch: int) -> ThroughputProfile:
    if path is not None and path.is_file():
        return ThroughputProfile.from_json(json.loads(path.read_text()))
    return ThroughputProfile(max_batch=max_batch)


@dataclass(eq=False, slots=True)
class _Pending:
    job: GenerationJob
    steps: int
    future: asyncio.Future
    running_until: float | None = None  # monotonic: the predicted end of the batch running it


class LocalPool:
    """Backend protocol over a batcher and a list of workers (ThreadWorker or ProcessWorker)."""

    def __init__(self, spec: EngineSpec, workers: list, config: PoolConfig = PoolConfig(),
                 profile: ThroughputProfile | None = None):
        self.spec = spec
        self.config = config
        self.workers = workers
        self.model = spec.preset if spec.weights_dir is None else Path(spec.weights_dir).name
        self._offer = self._make_offer(config.only_sizes)
        profile = profile or load_profile(config.profile_path, config.max_batch)
        self.profile = dataclasses.replace(profile, run_sizes=tuple(sorted(config.run_sizes)))
        max_batch = min(config.max_batch, max(config.run_sizes)) if config.run_sizes else config.max_batch
        # A lone job waits for company only when the arrivals say some is likely to come within the wait.
        self.batcher = SLABatcher(lambda: self.profile, max_batch=max_batch, max_wait_s=config.max_wait_s,
                                  arrivals=ArrivalRate(),
                                  max_batch_s=lambda: self.inflexible.max_batch_s(time.monotonic()))
        self._wakeup = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()  # batches: a shutdown lets them finish
        # background warm-ups of further shapes: a shutdown abandons them (a compile can take minutes)
        self._warming: set[asyncio.Task] = set()
        self._running_until: dict[int, float] = {}  # worker index -> predicted end of its batch
        self._jobs: dict[str, QueuedJob] = {}  # job id -> its place here, while its caller waits
        self._free_since: dict[int, float] = {}  # worker index -> when its last batch ended
        self._start_s: dict[int, float] = {}  # worker index -> how long its last start or restart took
        self._back_by: dict[int, tuple[float, float]] = {}  # restarting worker -> (predicted back, restart length)
        self._closing = False
        self._occupancy = 1.0
        self._mean_cycle_s = 0.0
        self.batches_run = 0
        self._starting: list[asyncio.Task] = []
        # Batches queued ahead of ours that this process does not see (remote workers: other gateways' batches
        # no worker has taken yet); counted as work ahead, so a long stream overflows to APIs.
        self.external_batches = lambda: 0
        self.inflexible = InflexibleArrivals()  # jobs only the pool could serve: the room kept for them
        self.demand = PoolDemand()  # every request it could serve, by what it saves them per GPU-second
        self.pool_only = SLABatcher(lambda: self.profile, max_batch=max_batch, max_wait_s=config.max_wait_s,
                                    arrivals=ArrivalRate()) if config.preempt else None
        # worker index -> the pausable batch it runs: a step's seconds, and its jobs
        self._pausable: dict[int, tuple[float, list[QueuedJob]]] = {}
        self._pausing: dict[int, float] = {}  # worker index -> predicted end of the pool-only batch pausing it

    @property
    def offer(self) -> Offer:
        return self._offer

    def _make_offer(self, sizes: frozenset[tuple[int, int]]) -> Offer:
        preset = PRESETS.get(self.spec.preset, PRESETS["sdxl"])
        return Offer(
            name=self.config.name, kind=BackendKind.LOCAL, models=(self.model,),
            sizes=SizeSupport(min_side=preset.min_side, max_side=preset.max_side, multiple_of=preset.multiple_of,
                              exact=sizes),
            max_n=self.config.max_n, default_steps=preset.default_steps if self.spec.weights_dir is None else 30,
            gpu_hour_usd=self.config.gpu_hour_usd,
        )

    def _refresh_offer(self) -> None:
        """Offer what every ready worker has warmed, no more: a compiled worker never compiles mid-serving, and
        the policy routes the rest elsewhere until the background warm-up reaches it."""
        mode = self.config.compiled
        ready = [w for w in self.workers if w.ready]
        if not mode or not ready:
            return
        common = set.intersection(*({(s.width, s.height, s.batch) for s in w.warmed} for w in ready))
        sizes = frozenset((w, h) for w, h, _ in common)
        if mode == "jit":
            run_sizes = tuple(sorted({b for _, _, b in common}))
            self.profile = dataclasses.replace(self.profile, run_sizes=run_sizes)
            self.batcher.max_batch = min(self.config.max_batch, max(run_sizes, default=1))
        if sizes != self._offer.sizes.exact:
            self._offer = self._make_offer(sizes)

    # --- state for the policy -------------------------------------------------

    def load(self) -> LoadReport:
        ready = [w for w in self.workers if w.ready]
        if self._closing:
            return LoadReport(Health.UNCONFIGURED, "closed")
        if not self.workers:
            return LoadReport(Health.UNCONFIGURED, "no workers yet (remote workers appear with their first heartbeat)")
        now = time.monotonic()
        returning = self._returning(now)
        if not ready and not returning:
            failed = all(w.state in ("failed", "down") for w in self.workers)
            detail = "; ".join(f"{w.name}: {w.detail}" for w in self.workers)
            return LoadReport(Health.UNCONFIGURED if failed else Health.WARMING, detail)
        workers = len(ready) + len(returning)
        running_s = self._work_running_s(now)
        idle = any(w.ready and not w.busy for w in self.workers)
        queue = self.batcher.points(now, running_s, workers)
        pre_emption = self._pre_emption(now, workers, ready)
        # A lone job is predicted to wait for company only when the arrivals say some is coming.
        wait = self.config.max_wait_s if self.batcher.arrivals.expects_any(self.config.max_wait_s) else 0.0
        pool = PoolModel(
            profile=self.profile, model=self.model, gpu_hour_usd=self.config.gpu_hour_usd, workers=workers,
            work_ahead_s=queue[-1].work_s if queue else running_s, typical_batch=self._occupancy,
            has_headroom=idle and not queue and not pre_emption.get("pool_only_queue"), max_wait_s=wait,
            running_s=running_s, queue=queue,
            busy_workers=sum(1 for w in ready if w.busy) + len(returning),
            reserved_share=self.inflexible.share(now, workers),
            sustained_share=self.inflexible.sustained_share(now, workers),
            batch_cap_s=self.inflexible.max_batch_s(now), demand=self.demand.table(now, workers), **pre_emption,
        )
        restarting = [f"{self.workers[i].name} restarting, back in ~{max(0.0, back - now):.0f} s"
                      for i, (back, _) in self._back_by.items()]
        warming = [w.name for i, w in enumerate(self.workers) if not w.ready and i not in self._back_by]
        growing = sum(len(w.pending_warm) for w in ready)
        detail = f"{len(ready)} worker(s) ready" + "".join(f"; {r}" for r in restarting) + \
            (f"; warming: {', '.join(warming)}" if warming else "") + \
            (f"; {growing} shape(s) left to warm in the background" if growing else "")
        return LoadReport(Health.OK, detail, pool)

    def _pre_emption(self, now: float, workers: int, ready: list) -> dict:
        """PoolModel's pre-emption fields, where this pool pre-empts and a ready worker can pause: what runs ahead
        of a pool-only job, and its queue. Per worker: a pausable batch holds it for one step (or for the pool-only
        batch pausing it); anything else it runs (a pool-only batch, a warm-up) and a restart hold it to the end."""
        if self.pool_only is None or not any(getattr(w, "pauses", False) for w in ready):
            return {}
        ahead = sum(self._returning(now))
        for index, end in self._running_until.items():
            if index in self._pausing:
                ahead += max(0.0, self._pausing[index] - now)
            elif index in self._pausable:
                ahead += self._pausable[index][0]
            else:
                ahead += max(0.0, end - now)
        return {"preemptive": True, "pool_only_running_s": ahead,
                "pool_only_queue": self.pool_only.points(now, ahead, workers)}

    def _work_running_s(self, now: float) -> float:
        """What the batches running here and on remote workers still need, summed over workers; a restarting
        worker's is the rest of its restart."""
        here = sum(max(0.0, end - now) for end in self._running_until.values())
        return here + sum(self._returning(now)) + self.external_batches() * self._mean_cycle_s

    def _returning(self, now: float) -> list[float]:
        """Seconds until each restarting worker is predicted back. One that takes twice as long as predicted is
        no longer counted on: the pool then says what it has (warming, when no other worker is ready)."""
        return [max(0.0, back - now) for back, length in self._back_by.values() if now < back + length]

    def _serving(self, now: float) -> int:
        """Workers that take work now or are predicted back from a restart soon."""
        return sum(1 for w in self.workers if w.ready) + len(self._returning(now))

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        # Kept: the loop holds only weak references to tasks, and a collected one would never finish warming.
        self._starting += [asyncio.create_task(self._start_worker(worker)) for worker in self.workers]
        self._scheduler = asyncio.create_task(self._schedule(), name=f"{self.config.name}-scheduler")

    def add_worker(self, worker) -> None:
        """A worker that joined while the pool runs (a remote one's proxy): started and scheduled like the rest.
        Workers are never removed (the scheduler keys them by position): one that leaves is marked down."""
        self.workers.append(worker)
        self._starting.append(asyncio.create_task(self._start_worker(worker)))

    def refresh_fleet(self) -> None:
        """Remote workers' state changed (warmed more shapes, came or went): learn and re-offer."""
        for worker in self.workers:
            if worker.ready:
                self._learn_warm_up(worker)
        self._refresh_offer()
        self._wakeup.set()

    async def _start_worker(self, worker) -> None:
        started = time.monotonic()
        try:
            await worker.start()
            self._start_s[self.workers.index(worker)] = time.monotonic() - started
            log.info("%s ready (warm-up: %s)", worker.name, worker.warm_timings)
            self._learn_warm_up(worker)
            self._refresh_offer()
        except Exception as exc:
            if self._closing:  # shut down while it warmed up: nothing failed
                log.info("%s stopped before it was ready", worker.name)
                return
            log.exception("%s failed to start", worker.name)
            worker.state, worker.detail = "failed", f"failed to start: {exc}"
        self._wakeup.set()

    async def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(w.ready for w in self.workers):
            if all(w.state == "failed" for w in self.workers) or time.monotonic() > deadline:
                raise BackendUnavailable("no local worker became ready")
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        """Drain: queued and running jobs finish (or meet their deadlines), then workers stop."""
        self._closing = True
        while self._queued() or self._running:
            self._wakeup.set()
            await asyncio.sleep(0.02)
            if not any(w.ready for w in self.workers):
                break
        for queue in self._queues():
            for item in queue.drain():
                _fail(item.payload, BackendUnavailable("local pool shut down"))
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
        for task in (*self._warming, *self._starting):
            task.cancel()  # a warm-up still running is abandoned, not awaited
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.stop()
        self._save_profile()

    def _save_profile(self) -> None:
        path = self.config.profile_path
        if path is not None and self.batches_run:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.profile.to_json(), indent=1))

    # --- requests -------------------------------------------------------------------

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        if self._closing or not self._serving(time.monotonic()):
            raise BackendUnavailable(f"local pool is not ready: {self.load().detail}")
        steps = job.steps or self._offer.default_steps
        guidance = job.guidance_scale if job.guidance_scale is not None else self.spec.guidance_scale
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(job, steps, future)
        queue = self.pool_only if job.preempts and self.pool_only is not None else self.batcher
        item = QueuedJob(key=(self.model, job.width, job.height, steps, guidance), slots=job.n, deadline=deadline,
                         enqueued=time.monotonic(), payload=pending,
                         start_by=job.start_by if queue is self.batcher else None)  # pool-only: nowhere else to go
        queue.put(item)
        self._jobs[job.id] = item
        self._wakeup.set()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            if queue.remove(item) or pending.running_until is None:  # never started: busy, not broken
                raise BackendQueueTimeout("local pool did not start the job before the deadline") from exc
            raise BackendTimeout("local pool did not finish before the deadline") from exc
        except asyncio.CancelledError:
            queue.remove(item)  # the caller went away (client gone, a hedge won): it never runs
            raise
        finally:
            if self._jobs.get(job.id) is item:
                del self._jobs[job.id]
            if not future.done():
                future.cancel()

    def note_arrival(self, arrival: PoolArrival) -> None:
        """A request this pool could serve was just routed, wherever it went (policies.reservation.pool_arrival).
        One it keeps room for (only the pool could serve it in time, or it is late everywhere and the pool alone
        would serve it in half its SLA) moves the batch cap and the reserved share while such requests keep
        arriving; every one says what the pool was worth to it per GPU-second, which the next requests are
        predicted against (PoolModel.denser_delay_s)."""
        arrival.record(time.monotonic(), self.inflexible, self.demand)

    def hedge_pays(self, job_id: str, due: float) -> bool:
        """Asked by the dispatcher when a job here passes its predicted latency: is it now predicted late enough
        past `due` (monotonic) for a second backend to race it (policies.reservation.hedge_pays)? A job this pool
        does not hold (never queued here, or done) says yes."""
        item = self._jobs.get(job_id)
        if item is None:
            return True
        now = time.monotonic()
        workers = max(1, self._serving(now))
        return pool_job_hedge_pays(self.batcher, item, now, due, running_until=item.payload.running_until,
                                   running_s=self._work_running_s(now), workers=workers,
                                   share=self.inflexible.share(now, workers))

    # --- scheduling -----------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._release_late()
            self._drop_expired()
            wake_at = self._launch_pool_only() if self.pool_only is not None else None
            while (worker := self._idle_worker()) is not None:
                batch, wake = self.batcher.next_batch(self._free_since.get(self.workers.index(worker)))
                if batch is None:
                    if wake is None and not self._queued():  # nothing queued: a good moment to grow
                        self._warm_idle()
                    wake_at = wake if wake_at is None else min(wake_at, wake or wake_at)
                    break
                self._launch(worker, batch)
            self._wakeup.clear()
            settle_at = self.batcher.next_settle()  # due even while every worker is busy
            if settle_at is not None:
                wake_at = settle_at if wake_at is None else min(wake_at, settle_at)
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    def _warm_idle(self) -> None:
        """Give each idle worker with shapes left to warm the next one; it is busy (and predicted so) meanwhile."""
        for index, worker in enumerate(self.workers):
            if worker.ready and not worker.busy and worker.pending_warm and not self._closing:
                shape = worker.pending_warm[0]
                worker.busy = True
                self._running_until[index] = time.monotonic() + self._warm_estimate(worker, shape)
                task = asyncio.create_task(self._warm(worker, index))
                self._warming.add(task)
                task.add_done_callback(self._warming.discard)

    def _warm_estimate(self, worker, shape) -> float:
        """How long a warm-up holds the worker: its run, plus a compile as long as the first shape's was."""
        run = self.profile.seconds(self.model, shape.width, shape.height, shape.steps, shape.batch)
        if self.config.compiled == "aot" and any((s.width, s.height) == (shape.width, shape.height)
                                                 for s in worker.warmed):
            return run  # the size's packages are loaded: nothing to compile
        first = worker.warm_timings.get(shape_key(worker.warmed[0]), {}) if worker.warmed else {}
        return run + max(0.0, first.get("first_s", 0.0) - first.get("steady_s", 0.0))

    async def _warm(self, worker, index: int) -> None:
        try:
            shape = await worker.warm_next()
            log.info("%s warmed %s in the background (%s)", worker.name, shape,
                     worker.warm_timings.get(shape_key(shape)) if shape else None)
            self._learn_warm_up(worker)
            self._refresh_offer()
        except WorkerCrashed:
            if not self._closing:  # a worker stopped by the shutdown is not restarted
                log.error("%s crashed while warming; restarting it", worker.name)
                self._restart_soon(worker)
        except Exception:
            log.exception("%s failed to warm %s; it keeps serving what it has", worker.name,
                          worker.pending_warm[:1])
            if worker.pending_warm:
                worker.pending_warm.pop(0)
        finally:
            self._freed(worker, index)

    def _release_late(self) -> None:
        now = time.monotonic()
        workers = self._serving(now) or 1
        for item in self.batcher.settle(now, self._work_running_s(now), workers):  # as load() predicted it
            _fail(item.payload, BackendReleased("local pool would finish late; released in time for the next backend"))

    def _idle_worker(self):
        idle = [w for w in self.workers if w.ready and not w.busy]
        return min(idle, key=lambda w: w.assigned_slots) if idle else None

    def _queues(self) -> list[SLABatcher]:
        return [self.batcher] if self.pool_only is None else [self.pool_only, self.batcher]

    def _queued(self) -> int:
        return sum(len(queue) for queue in self._queues())

    def _drop_expired(self) -> None:
        """Withdraw the queued jobs whose caller is gone or whose deadline has passed (the latter told so)."""
        now = time.monotonic()
        for queue in self._queues():
            for item in queue.take(lambda j: j.payload.future.done() or j.deadline <= now):
                _fail(item.payload, BackendQueueTimeout("deadline passed while queued"))

    def _launch_pool_only(self) -> float | None:
        """Pool-only batches first: on an idle worker, else inside the pausable batch with the most slack if it stays
        on time after it (else they wait for a free worker). Returns when to ask again while such work waits for
        company."""
        while len(self.pool_only):
            worker = self._idle_worker()
            if worker is None and not any(i not in self._pausing for i in self._pausable):
                return None
            index = self.workers.index(worker) if worker is not None else None
            batch, wake = self.pool_only.next_batch(self._free_since.get(index) if worker else time.monotonic())
            if batch is None:
                return wake
            if worker is not None:
                self._launch(worker, batch, pausable=False, queue=self.pool_only)  # never paused itself
                continue
            index = self._worker_to_pause(batch.predicted_s)
            if index is None:  # every running batch would then miss a deadline: wait for a worker instead
                self.pool_only.restore(batch.jobs)
                return None
            self._launch_paused(self.workers[index], index, batch)
        return None

    def _worker_to_pause(self, seconds: float) -> int | None:
        """The pausable batch with the most slack, if it stays on time `seconds` later; None if none would."""
        slack = {i: min(j.deadline for j in jobs) - self._running_until.get(i, 0.0) - seconds
                 for i, (_, jobs) in self._pausable.items() if i not in self._pausing}
        best = max(slack, key=slack.get, default=None)
        return best if best is not None and slack[best] >= 0 else None

    def _launch(self, worker, batch: Batch, pausable: bool | None = None, queue: SLABatcher | None = None) -> None:
        worker.busy, worker.assigned_slots = True, batch.slots
        index = self.workers.index(worker)
        self._running_until[index] = ends = time.monotonic() + batch.predicted_s
        for item in batch.jobs:
            item.payload.running_until = ends
        if pausable is None:  # flexible work on a pool that pre-empts, on a worker that can pause
            pausable = self.pool_only is not None and getattr(worker, "pauses", False)
        if pausable:
            self._pausable[index] = (batch.predicted_s / max(1, batch.key[3]), batch.jobs)
        self._start(self._run(worker, index, batch, pausable, queue or self.batcher))

    def _launch_paused(self, worker, index: int, batch: Batch) -> None:
        """A pool-only batch run inside worker `index`'s pausable batch, which ends later by as much."""
        now = time.monotonic()
        step_s, paused = self._pausable.get(index, (0.0, []))
        self._pausing[index] = ends = now + step_s + batch.predicted_s
        self._running_until[index] = later = self._running_until.get(index, now) + batch.predicted_s
        for item in paused:
            item.payload.running_until = later  # a hedge asks when it now ends
        for item in batch.jobs:
            item.payload.running_until = ends
        self._start(self._run_paused(worker, index, batch))

    def _start(self, run) -> None:
        task = asyncio.create_task(run)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_paused(self, worker, index: int, batch: Batch) -> None:
        jobs = [item.payload for item in batch.jobs]
        try:
            output = await worker.run_paused(self._request(batch))
        except WorkerCrashed:  # the paused batch's run restarts the worker
            self._requeue(batch, self.pool_only)
            return
        except Exception as exc:
            self._failed(jobs, worker, exc)
            return
        finally:
            self._pausing.pop(index, None)
            self._wakeup.set()
        await self._hand_back(batch, jobs, output, output.seconds)

    @staticmethod
    def _requeue(batch: Batch, queue: SLABatcher) -> None:
        """A batch its worker died running goes back to its queue (not counted as new arrivals)."""
        for item in batch.jobs:
            item.payload.running_until = None
        queue.restore(batch.jobs)

    @staticmethod
    def _failed(jobs: list[_Pending], worker, exc: Exception) -> None:
        log.exception("batch failed on %s", worker.name)
        for p in jobs:
            _fail(p, BackendTransientError(f"local batch failed: {type(exc).__name__}: {exc}"))

    def _request(self, batch: Batch) -> BatchRequest:
        jobs = [item.payload for item in batch.jobs]
        model, width, height, steps, guidance = batch.key
        prompts, seeds, negatives = [], [], []
        for p in jobs:
            base_seed = p.job.seed if p.job.seed is not None else int.from_bytes(p.job.id.encode()[:4], "big")
            prompts += [p.job.prompt] * p.job.n
            seeds += [base_seed + i for i in range(p.job.n)]
            negatives += [p.job.negative_prompt or ""] * p.job.n
        return BatchRequest(prompts=prompts, seeds=seeds, width=width, height=height, steps=steps,
                            negative_prompts=negatives if any(negatives) else None, guidance_scale=guidance,
                            output_format=jobs[0].job.output_format)

    async def _run(self, worker, index: int, batch: Batch, pausable: bool, queue: SLABatcher) -> None:
        jobs = [item.payload for item in batch.jobs]
        request = self._request(batch)
        launched = time.monotonic()
        try:
            output = await (worker.run(request, pausable=True) if pausable else worker.run(request))
        except WorkerCrashed:
            log.error("%s crashed running a batch of %d; re-queueing its jobs", worker.name, batch.slots)
            self._requeue(batch, queue)
            self._restart_soon(worker)
            return
        except Exception as exc:
            self._failed(jobs, worker, exc)
            return
        finally:
            self._freed(worker, index)
        # The worker's whole cycle, not just its device time: the hand-back holds it too, and what the queue
        # predicts from is how soon the next batch can start (on an H200, SD1.5 batches ran ~25% slower end to
        # end than their device time when the worker also encoded, and the predictions were that optimistic).
        # Pool-only batches run inside it are not its time.
        await self._hand_back(batch, jobs, output, time.monotonic() - launched - output.timings.get("paused_s", 0.0))

    async def _hand_back(self, batch: Batch, jobs: list[_Pending], output, cycle: float) -> None:
        self._record(batch, cycle)
        try:  # the worker is already on its next batch: encoding is off the GPU's cycle
            output = await asyncio.to_thread(encoded, output)
        except Exception as exc:
            log.exception("encoding a batch of %d failed", batch.slots)
            for p in jobs:
                _fail(p, BackendTransientError(f"local batch could not be encoded: {type(exc).__name__}: {exc}"))
            return
        self._deliver(jobs, dataclasses.replace(output, seconds=cycle), batch.slots)

    def _freed(self, worker, index: int) -> None:
        """A batch or a background warm-up has ended: the worker takes work again, and a lone job's wait for
        company counts from now (see `SLABatcher.next_batch`)."""
        worker.busy, worker.assigned_slots = False, 0
        self._running_until.pop(index, None)
        self._pausable.pop(index, None)
        self._free_since[index] = time.monotonic()
        self._wakeup.set()

    def _restart_soon(self, worker) -> None:
        """Restart a crashed worker, predicted back as soon as its last start or restart took."""
        index = self.workers.index(worker)
        self._predict_back(index)
        self._wakeup.set()  # load() and release see the restart from now
        self._starting = [t for t in self._starting if not t.done()]
        self._starting.append(asyncio.create_task(self._restart(worker, index)))  # kept: see start()

    def _predict_back(self, index: int) -> None:
        if index in self._start_s:
            self._back_by[index] = (time.monotonic() + self._start_s[index], self._start_s[index])

    async def _restart(self, worker, index: int) -> None:
        """Until it is back: a worker that served before and dies again while restarting (killed again, out of
        memory while warming) is tried again after a growing pause, not left failed for the pool's lifetime."""
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                await worker.restart()
                self._start_s[index] = time.monotonic() - started
                log.info("%s restarted in %.1f s", worker.name, self._start_s[index])
                self._refresh_offer()
                break
            except Exception as exc:
                if self._closing:
                    break
                pause = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.error("%s failed to restart (%s: %s); trying again in %.0f s", worker.name,
                          type(exc).__name__, exc, pause)
                worker.state, worker.detail = "failed", f"restart failed: {exc}; trying again in {pause:.0f} s"
                self._back_by.pop(index, None)  # not coming back on its own: the pool must not wait for it
                self._wakeup.set()
                await asyncio.sleep(pause)
                self._predict_back(index)
        self._back_by.pop(index, None)
        self._wakeup.set()

    def _learn_warm_up(self, worker) -> None:
        """A measured profile entry for every warmed shape (timed after its compile), where the profile has
        none: predictions for warmed shapes, and for others by scaling from them, never come from the prior."""
        for shape in worker.warmed:
            timing = worker.warm_timings.get(shape_key(shape))
            seconds = timing.get("steady_s") if isinstance(timing, dict) else None
            if not seconds:
                continue
            row = self.profile.table.get((self.model, shape.width, shape.height, shape.steps), {})
            if self.profile.run_size(shape.batch) not in row:
                self.profile = self.profile.observe(self.model, shape.width, shape.height, shape.steps, shape.batch,
                                                    seconds, weight=1.0)

    def _record(self, batch: Batch, seconds: float) -> None:
        model, width, height, steps, _ = batch.key
        self.profile = self.profile.observe(model, width, height, steps, batch.slots, seconds)
        self._occupancy = 0.8 * self._occupancy + 0.2 * batch.slots
        self._mean_cycle_s = seconds if not self.batches_run else 0.8 * self._mean_cycle_s + 0.2 * seconds
        self.batches_run += 1

    def _deliver(self, jobs: list[_Pending], output, slots: int) -> None:
        offset = 0
        for p in jobs:
            images = output.images[offset: offset + p.job.n]
            offset += p.job.n
            if p.future.done():
                continue
            p.future.set_result(GenerationResult(
                images=tuple(GeneratedImage(data, media_type=f"image/{p.job.output_format}") for data in images),
                model=self.model, width=p.job.width, height=p.job.height,
                gpu_seconds=output.seconds * p.job.n / slots,  # this job's share of the batch
                extra={"batch_size": slots},
            ))


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)
