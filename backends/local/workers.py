"""GPU workers: one engine each, in this process (a thread) or in a child process per GPU.

A worker runs one batch at a time. A child process that dies mid-batch raises
`WorkerCrashed` to the pool, which re-queues the batch's jobs and restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .encode import encode_batch, encode_pixels, encodes_on_device
from .engine import DiffusionEngine, EngineSpec

__all__ = ["BatchOutput", "BatchRequest", "ProcessWorker", "ThreadWorker", "WarmShape", "WorkerCrashed", "encoded",
           "shape_key"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WarmShape:
    """A batch shape to compile and run once before the worker reports ready."""

    width: int
    height: int
    steps: int
    batch: int = 1


@dataclass(frozen=True, slots=True)
class BatchRequest:
    prompts: list[str]
    seeds: list[int]
    width: int
    height: int
    steps: int
    negative_prompts: list[str] | None = None
    guidance_scale: float | None = None
    output_format: str = "png"


@dataclass(slots=True)
class BatchOutput:
    images: list[bytes]
    seconds: float  # the worker's part (the pool replaces it with the whole cycle it saw)
    timings: dict = field(default_factory=dict)
    pixels: Any = None  # (B, H, W, 3) uint8 on the host, still to encode (`encoded`); images is empty until then
    output_format: str = "png"


class WorkerCrashed(RuntimeError):
    """The worker's process died; its batch never finished."""


def _run_batch(engine: DiffusionEngine, req: BatchRequest, encode: bool = False) -> BatchOutput:
    """Generate a batch. Its images come back as host pixels for the caller to encode while this worker runs its
    next batch (GPU JPEG, a few ms, is done here), or encoded when `encode` is set."""
    started = time.perf_counter()
    images = engine.generate(req.prompts, width=req.width, height=req.height, steps=req.steps, seeds=req.seeds,
                             negative_prompts=req.negative_prompts, guidance_scale=req.guidance_scale,
                             output_type="uint8")
    if encode or encodes_on_device(images, req.output_format):
        return BatchOutput(encode_batch(images, req.output_format), time.perf_counter() - started)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    return BatchOutput([], time.perf_counter() - started, pixels=pixels, output_format=req.output_format)


def encoded(output: BatchOutput) -> BatchOutput:
    """The batch's images as file bytes (blocking: run it on a thread). Encoded here when the worker handed back
    pixels, so the GPU was already on its next batch meanwhile."""
    if output.pixels is None:
        return output
    return dataclasses.replace(output, images=encode_pixels(output.pixels, output.output_format), pixels=None)


def _timed_run(engine: DiffusionEngine, shape: WarmShape) -> float:
    started = time.perf_counter()
    engine.generate(["warm-up"] * shape.batch, width=shape.width, height=shape.height, steps=shape.steps,
                    seeds=list(range(shape.batch)))
    return time.perf_counter() - started


def shape_key(shape: WarmShape) -> str:
    return f"{shape.width}x{shape.height}x{shape.batch}@{shape.steps}"


def _warm_one(engine: DiffusionEngine, shape: WarmShape, report) -> dict:
    """Make one shape ready and time it: prepare its size (AOT packages loaded or built), run it once (compiling
    it under torch.compile; first use of the size's kernels under AOT), then time a run after that. The timed
    run is what the pool's profile learns, so a warmed shape never falls back to the prior (a CPU-scale guess)."""
    report(f"warming {shape.width}x{shape.height} x{shape.batch}, {shape.steps} steps")
    fresh_size = not engine.is_prepared(shape.width, shape.height)
    prepared = engine.prepare(shape.width, shape.height, report) if fresh_size else {}
    first = _timed_run(engine, shape)
    again = engine.compiled and (fresh_size or engine.aot is None)  # AOT: other batch sizes load nothing new
    steady = _timed_run(engine, shape) if again else first
    return {shape_key(shape): {"first_s": round(first, 4), "steady_s": round(steady, 4), **prepared}}


def _warm(engine: DiffusionEngine, shapes: list[WarmShape], report) -> dict:
    timings = {}
    for shape in shapes:
        timings |= _warm_one(engine, shape, report)
    return timings


class _WorkerBase:
    """A worker is ready once its first warm shape is; the rest (`pending_warm`) are warmed when the pool finds
    it idle (`warm_next`), so a fresh host serves its first shape early and grows into the others."""

    def __init__(self, spec: EngineSpec, name: str, warm: list[WarmShape]):
        self.spec = spec
        self.name = name
        self.warm_shapes = warm
        self.warmed: list[WarmShape] = []
        self.pending_warm: list[WarmShape] = []
        self.state = "starting"
        self.detail = "starting"
        self.busy = False
        self.assigned_slots = 0  # images in the batch it is running (for least-loaded choice)
        self.warm_timings: dict = {}
        self.restarts = 0
        # A further shape compiling in the background (minutes on a GPU): a stop does not wait for it.
        self._warming_more = False

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _report(self, detail: str) -> None:
        self.detail = detail

    def _first_warmed(self, timings: dict) -> None:
        self.warm_timings = dict(timings)
        self.warmed = list(self.warm_shapes[:1])
        self.pending_warm = list(self.warm_shapes[1:])

    async def warm_next(self) -> WarmShape | None:
        """Warm the next pending shape (the caller marks the worker busy); returns it, or None if none."""
        if not self.pending_warm:
            return None
        shape = self.pending_warm[0]
        self._warming_more = True
        try:
            timings = await self._warm_remote(shape)
        except Exception:
            self._warming_more = False
            raise
        # (cancelled, the compile goes on in its thread or child: the flag stays, so a stop does not wait for it)
        self._warming_more = False
        self.pending_warm.remove(shape)
        self.warm_timings |= timings
        self.warmed.append(shape)
        return shape

    async def _warm_remote(self, shape: WarmShape) -> dict:  # pragma: no cover - each worker kind has one
        raise NotImplementedError


class ThreadWorker(_WorkerBase):
    """The engine in this process, run on one dedicated thread (CPU, or a single GPU)."""

    def __init__(self, spec: EngineSpec, name: str = "worker-0", warm: list[WarmShape] | None = None,
                 engine: DiffusionEngine | None = None):
        super().__init__(spec, name, warm or [])
        self.engine = engine or DiffusionEngine(spec)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.state = "warming"
        if self.engine.pipe is None:
            self.detail = "loading pipeline"
            await loop.run_in_executor(self._executor, self.engine.load)
        timings = await loop.run_in_executor(self._executor, _warm, self.engine, self.warm_shapes[:1], self._report)
        self._first_warmed(timings)
        self.state, self.detail = "ready", "ready"

    async def run(self, req: BatchRequest) -> BatchOutput:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _run_batch, self.engine, req)

    async def _warm_remote(self, shape: WarmShape) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _warm_one, self.engine, shape,
                                                                lambda detail: None)

    async def restart(self) -> None:
        await self.start()

    async def stop(self) -> None:
        warming = self.state != "ready" or self._warming_more
        self.state, self.detail = "stopped", "stopped"
        if warming:
            # A warm-up (minutes of compiling on a GPU) cannot be interrupted in a thread: leave it, and the
            # process exits without waiting for it (gateway.cli), rather than hanging the shutdown.
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)


def _child_main(spec: EngineSpec, warm: list[WarmShape], conn) -> None:
    """Entry point of a worker process: load, warm, then serve batches until told to stop."""
    try:
        engine = DiffusionEngine(spec)
        engine.load()
        timings = _warm(engine, warm[:1], lambda detail: conn.send(("progress", detail)))
        conn.send(("ready", timings))
    except Exception as exc:  # report and exit; the parent marks the worker failed
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            if isinstance(message, WarmShape):
                conn.send(("ok", _warm_one(engine, message, lambda detail: None)))
            else:
                conn.send(("ok", _run_batch(engine, message)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessWorker(_WorkerBase):
    """The engine in a child process (one per GPU); a crash is detected and reported, never hangs the pool."""

    def __init__(self, spec: EngineSpec, name: str, warm: list[WarmShape] | None = None):
        super().__init__(spec, name, warm or [])
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._conn = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _spawn_and_wait(self) -> None:
        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(target=_child_main, args=(self.spec, self.warm_shapes, child),
                                          name=self.name, daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        while True:
            kind, payload = self._recv()
            if kind == "progress":
                self.detail = payload
            elif kind == "ready":
                self._first_warmed(payload)
                return
            else:
                raise RuntimeError(f"worker {self.name} failed to start: {payload}")

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerCrashed(f"worker {self.name} (pid {self.pid}) died") from exc

    async def start(self) -> None:
        self.state, self.detail = "warming", "starting process"
        await asyncio.get_running_loop().run_in_executor(self._executor, self._spawn_and_wait)
        self.state, self.detail = "ready", "ready"

    def _roundtrip(self, req):
        try:
            self._conn.send(req)
        except (OSError, BrokenPipeError) as exc:
            raise WorkerCrashed(f"worker {self.name} is gone") from exc
        kind, payload = self._recv()
        if kind == "ok":
            return payload
        raise RuntimeError(payload)

    async def run(self, req: BatchRequest) -> BatchOutput:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._roundtrip, req)
        except WorkerCrashed:
            self.state, self.detail = "crashed", "crashed; restarting"
            raise

    async def _warm_remote(self, shape: WarmShape) -> dict:
        return await self.run(shape)

    async def restart(self) -> None:
        self._terminate()
        self.restarts += 1
        await self.start()

    def _terminate(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        if self._process is not None:
            self._process.join(timeout=5)
        if self._conn is not None:
            self._conn.close()

    async def stop(self) -> None:
        ready = self.state == "ready" and not self._warming_more
        self.state, self.detail = "stopped", "stopped"
        if ready and self._conn is not None and self._process is not None and self._process.is_alive():
            try:  # a ready child finishes its batch and exits; a warming one is not listening: killed at once
                # (a background warm-up included: a shutdown cancels it before it stops the workers)
                self._conn.send(None)
                await asyncio.to_thread(self._process.join, 10)
            except OSError:
                pass
        await asyncio.to_thread(self._terminate)
        self._executor.shutdown(wait=False, cancel_futures=True)
