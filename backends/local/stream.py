"""The pool's workers on other hosts, through Redis Streams (`local.workers: remote` on gateways, `imagegw worker`
on GPU hosts).

Gateways form batches exactly as for workers in their own process (`LocalPool`: deadlines, late binding, the
profile), then hand each batch to the fleet with one XADD to one stream read by a consumer group: whichever
worker is free takes it. A worker:

- publishes its live state (ready, warmed shapes and their timings, what it runs) every second into a hash that
  expires unless renewed: gateways see every live worker, and one proxy (`StreamWorker`) stands for each in the
  gateway's pool, so the policy's predictions count the fleet's workers;
- while it runs a batch, renews its claim on the entry (XCLAIM to itself resets the entry's idle time): the entry
  of a worker that died goes idle, and the next free worker takes it over with XAUTOCLAIM after `reclaim_s`;
  an entry delivered `MAX_DELIVERIES` times fails instead of running again (it may be what kills workers);
- writes the images into a hash of their own that expires after `result_ttl_s` (results never travel inside
  stream messages), then tells the gateway on that gateway's reply stream, and acknowledges (XACK + XDEL).

Messages are JSON and raw image bytes: nothing read from Redis is unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import msgspec

from .workers import BatchOutput, BatchRequest, WarmShape, WorkerCrashed, encoded

__all__ = ["FleetKeys", "RemoteFleet", "StreamConsumer", "StreamWorker"]

log = logging.getLogger(__name__)

MAX_DELIVERIES = 2  # a batch runs at most once more after the worker running it died


@dataclass(frozen=True, slots=True)
class FleetKeys:
    namespace: str = "default"

    def _k(self, *parts: str) -> str:
        return ":".join(("imagegw", self.namespace, "pool", *parts))

    @property
    def batches(self) -> str:
        return self._k("batches")

    group = "workers"

    def worker(self, worker_id: str) -> str:
        return self._k("worker", worker_id)

    @property
    def worker_prefix(self) -> str:
        return self._k("worker", "")

    def result(self, batch_id: str) -> str:
        return self._k("result", batch_id)

    def replies(self, gateway_id: str) -> str:
        return self._k("replies", gateway_id)


def _shape(d: dict) -> WarmShape:
    return WarmShape(int(d["width"]), int(d["height"]), int(d["steps"]), int(d.get("batch", 1)))


# --- gateway side ---------------------------------------------------------------------------------------------


class StreamWorker:
    """The gateway's stand-in for one live remote worker: the pool schedules it like a worker of its own."""

    def __init__(self, fleet: RemoteFleet, worker_id: str):
        self.fleet = fleet
        self.id = worker_id
        self.name = f"remote-{worker_id}"
        self.spec = None
        self.state, self.detail = "warming", "waiting for its first heartbeat"
        self.busy = False
        self.assigned_slots = 0
        self.warm_shapes: list[WarmShape] = []
        self.warmed: list[WarmShape] = []
        self.pending_warm: list[WarmShape] = []  # a remote worker warms its own shapes when idle
        self.warm_timings: dict = {}
        self.restarts = 0
        self._ready = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def update(self, beat: dict) -> None:
        self.warmed = [_shape(s) for s in beat.get("warmed", [])]
        self.warm_timings = beat.get("warm_timings", {})
        self.state = "ready" if beat.get("state") == "ready" else "warming"
        self.detail = beat.get("detail", self.state)
        if self.ready:
            self._ready.set()

    def lost(self) -> None:
        self.state, self.detail = "down", "no heartbeat (host gone?); its batches go to other workers"
        self._ready.clear()

    async def start(self) -> None:
        await self._ready.wait()

    async def restart(self) -> None:
        await self._ready.wait()

    async def stop(self) -> None:
        self._ready.set()

    async def warm_next(self) -> WarmShape | None:
        return None

    async def run(self, req: BatchRequest) -> BatchOutput:
        return await self.fleet.submit(req)


class RemoteFleet:
    """Gateway side: keeps one StreamWorker per live remote worker in the pool, sends batches, reads replies."""

    def __init__(self, redis, keys: FleetKeys, pool, *, gateway_id: str | None = None,
                 poll_interval_s: float = 1.0, max_batch_s: float = 900.0):
        self.redis, self.keys, self.pool = redis, keys, pool
        self.gateway_id = gateway_id or uuid.uuid4().hex[:16]
        self.poll_interval_s = poll_interval_s
        self.max_batch_s = max_batch_s
        self.proxies: dict[str, StreamWorker] = {}
        self._waiting: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.lag = 0  # batches in the stream no worker has taken yet (from every gateway)

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # BUSYGROUP: it exists
            await self.redis.xgroup_create(self.keys.batches, self.keys.group, id="0", mkstream=True)
        await self.refresh()
        self._tasks = [asyncio.create_task(self._watch(), name="fleet-watch"),
                       asyncio.create_task(self._replies(), name="fleet-replies")]

    async def close(self) -> None:
        # The loops also stop at their next turn (a blocked read returns within a second): a cancellation that
        # a client library turns into an error of its own must not keep a shutdown waiting.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3.0)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WorkerCrashed("gateway shutting down"))

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.poll_interval_s)
            with contextlib.suppress(Exception):  # Redis away: the last view stands; replies resume later
                await self.refresh()

    async def refresh(self) -> None:
        """Adopt new workers, update the live ones, mark the silent ones down."""
        seen = set()
        async for key in self.redis.scan_iter(match=self.keys.worker_prefix + "*", count=200):
            raw = await self.redis.get(key)
            if raw is None:
                continue
            beat = msgspec.json.decode(raw)
            worker_id = beat["id"]
            seen.add(worker_id)
            proxy = self.proxies.get(worker_id)
            if proxy is None:
                proxy = self.proxies[worker_id] = StreamWorker(self, worker_id)
                proxy.update(beat)
                self.pool.add_worker(proxy)
                log.info("remote worker %s joined (%s)", worker_id, beat.get("host"))
            else:
                proxy.update(beat)
        for worker_id, proxy in self.proxies.items():
            if worker_id not in seen and proxy.state != "down":
                log.warning("remote worker %s stopped sending heartbeats", worker_id)
                proxy.lost()
        self.pool.refresh_fleet()
        with contextlib.suppress(Exception):
            groups = await self.redis.xinfo_groups(self.keys.batches)
            self.lag = next((int(g.get("lag") or 0) for g in groups
                             if _text(g.get("name")) == self.keys.group), 0)

    async def submit(self, req: BatchRequest) -> BatchOutput:
        batch_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._waiting[batch_id] = future
        try:
            await self.redis.xadd(self.keys.batches, {
                "id": batch_id, "reply": self.keys.replies(self.gateway_id),
                "req": msgspec.json.encode(dataclasses.asdict(req)), "sent": str(time.time())})
            async with asyncio.timeout(self.max_batch_s):
                meta, images = await future
        except TimeoutError as exc:
            raise WorkerCrashed(f"no worker answered batch {batch_id} within {self.max_batch_s:.0f}s") from exc
        finally:
            self._waiting.pop(batch_id, None)
        if meta.get("error"):
            raise RuntimeError(meta["error"])
        return BatchOutput(images, float(meta["seconds"]), meta.get("timings", {}))

    async def _replies(self) -> None:
        stream, last = self.keys.replies(self.gateway_id), "$"
        while not self._closing:
            try:
                answer = await self.redis.xread({stream: last}, count=64, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)
                continue
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    await self._resolve(_text(fields[b"id"]))

    async def _resolve(self, batch_id: str) -> None:
        key = self.keys.result(batch_id)
        result = await self.redis.hgetall(key)
        await self.redis.delete(key)
        future = self._waiting.get(batch_id)
        if future is None or future.done() or not result:
            return
        meta = msgspec.json.decode(result[b"meta"])
        future.set_result((meta, [result[f"img:{i}".encode()] for i in range(int(meta.get("images", 0)))]))


# --- worker side -----------------------------------------------------------------------------------------------


class StreamConsumer:
    """One real worker (one GPU) of an `imagegw worker` process, serving the fleet's stream."""

    def __init__(self, redis, keys: FleetKeys, worker, *, worker_id: str | None = None, heartbeat_s: float = 1.0,
                 reclaim_s: float = 10.0, result_ttl_s: float = 300.0):
        self.redis, self.keys, self.worker = redis, keys, worker
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{worker.name}".replace(":", "_")
        self.heartbeat_s, self.reclaim_s, self.result_ttl_s = heartbeat_s, reclaim_s, result_ttl_s
        self.batches_run = 0
        self._stopping = False

    def _beat(self) -> bytes:
        w = self.worker
        return msgspec.json.encode({
            "id": self.id, "host": socket.gethostname(), "name": w.name, "state": w.state, "detail": w.detail,
            "busy": w.busy, "warmed": [dataclasses.asdict(s) for s in w.warmed], "warm_timings": w.warm_timings,
            "batches_run": self.batches_run, "at": time.time()})

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.redis.set(self.keys.worker(self.id), self._beat(),
                                     px=int(max(3 * self.heartbeat_s, 2.0) * 1000))
            await asyncio.sleep(self.heartbeat_s)

    async def run(self) -> None:
        """Start the engine, then take batches until `stop()`; the heartbeat runs throughout."""
        with contextlib.suppress(Exception):
            await self.redis.xgroup_create(self.keys.batches, self.keys.group, id="0", mkstream=True)
        beating = asyncio.create_task(self._heartbeat())
        try:
            await self.worker.start()
            log.info("worker %s ready: %s", self.id, self.worker.warm_timings)
            while not self._stopping:
                entry = await self._next()
                if entry is None:
                    if self.worker.pending_warm:  # idle: grow into the next warm shape
                        self.worker.busy = True
                        try:
                            await self.worker.warm_next()
                        finally:
                            self.worker.busy = False
                    continue
                await self._serve(*entry)
        finally:
            beating.cancel()
            with contextlib.suppress(Exception):
                await self.redis.delete(self.keys.worker(self.id))

    def stop(self) -> None:
        self._stopping = True

    async def _next(self):
        """A batch whose worker died (claimed over), else a new one; None after a second of nothing."""
        try:
            _, claimed, *_ = await self.redis.xautoclaim(self.keys.batches, self.keys.group, self.id,
                                                         min_idle_time=int(self.reclaim_s * 1000), count=1)
            if claimed:
                entry_id, fields = claimed[0]
                if fields:
                    return entry_id, fields, True
            answer = await self.redis.xreadgroup(self.keys.group, self.id, {self.keys.batches: ">"}, count=1,
                                                 block=1000)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("worker %s: Redis: %s", self.id, type(exc).__name__)
            await asyncio.sleep(1.0)
            return None
        for _, entries in answer or []:
            for entry_id, fields in entries:
                return entry_id, fields, False
        return None

    async def _deliveries(self, entry_id) -> int:
        rows = await self.redis.xpending_range(self.keys.batches, self.keys.group, min=entry_id, max=entry_id,
                                               count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    async def _serve(self, entry_id, fields: dict, reclaimed: bool) -> None:
        batch_id, reply = _text(fields[b"id"]), _text(fields[b"reply"])
        if reclaimed:
            deliveries = await self._deliveries(entry_id)
            log.warning("worker %s took over batch %s (delivery %d) from a worker that stopped", self.id, batch_id,
                        deliveries)
            if deliveries > MAX_DELIVERIES:
                await self._answer(entry_id, batch_id, reply, {"error": f"batch {batch_id} was lost with "
                                                               f"{deliveries - 1} workers; not run again"}, [])
                return
        renewing = asyncio.create_task(self._renew(entry_id))
        self.worker.busy = True
        try:
            req = BatchRequest(**msgspec.json.decode(fields[b"req"]))
            output = await asyncio.to_thread(encoded, await self.worker.run(req))
            meta, images = {"seconds": output.seconds, "timings": output.timings,
                            "images": len(output.images)}, output.images
        except WorkerCrashed:
            log.error("worker %s: engine crashed on batch %s; restarting (the batch is taken over)", self.id,
                      batch_id)
            renewing.cancel()
            await self.worker.restart()
            return
        except Exception as exc:
            meta, images = {"error": f"{type(exc).__name__}: {exc}"}, []
        finally:
            renewing.cancel()
            self.worker.busy = False
        self.batches_run += 1
        await self._answer(entry_id, batch_id, reply, meta, images)

    async def _renew(self, entry_id) -> None:
        while True:
            await asyncio.sleep(self.reclaim_s / 3)
            with contextlib.suppress(Exception):
                await self.redis.xclaim(self.keys.batches, self.keys.group, self.id, min_idle_time=0,
                                        message_ids=[entry_id], justid=True)

    async def _answer(self, entry_id, batch_id: str, reply: str, meta: dict, images: list[bytes]) -> None:
        key = self.keys.result(batch_id)
        mapping = {"meta": msgspec.json.encode(meta)} | {f"img:{i}": data for i, data in enumerate(images)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, int(self.result_ttl_s * 1000))
            pipe.xadd(reply, {"id": batch_id}, maxlen=10_000, approximate=True)
            pipe.pexpire(reply, int(self.result_ttl_s * 1000))
            pipe.xack(self.keys.batches, self.keys.group, entry_id)
            pipe.xdel(self.keys.batches, entry_id)
            await pipe.execute()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
