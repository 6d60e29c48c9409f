"""GPU workers: one engine each, in this process (a thread) or in a child process per GPU.

A worker runs one batch at a time. A child process that dies mid-batch raises
`WorkerCrashed` to the pool, which re-queues the batch's jobs and restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .engine import DiffusionEngine, EngineSpec, encode_images

__all__ = ["BatchOutput", "BatchRequest", "ProcessWorker", "ThreadWorker", "WarmShape", "WorkerCrashed"]

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
    seconds: float  # device time of the batch, encode excluded
    timings: dict = field(default_factory=dict)


class WorkerCrashed(RuntimeError):
    """The worker's process died; its batch never finished."""


def _run_batch(engine: DiffusionEngine, req: BatchRequest) -> BatchOutput:
    started = time.perf_counter()
    images = engine.generate(req.prompts, width=req.width, height=req.height, steps=req.steps, seeds=req.seeds,
                             negative_prompts=req.negative_prompts, guidance_scale=req.guidance_scale)
    seconds = time.perf_counter() - started
    return BatchOutput(encode_images(images, req.output_format), seconds)


def _timed_run(engine: DiffusionEngine, shape: WarmShape) -> float:
    started = time.perf_counter()
    engine.generate(["warm-up"] * shape.batch, width=shape.width, height=shape.height, steps=shape.steps,
                    seeds=list(range(shape.batch)))
    return time.perf_counter() - started


def _warm(engine: DiffusionEngine, shapes: list[WarmShape], report) -> dict:
    """Run each shape once (compiling it, on a compiled engine) and time a run after that: the timed run is
    what the pool's profile learns, so a warmed shape never falls back to the prior (a CPU-scale guess)."""
    timings = {}
    for i, shape in enumerate(shapes):
        report(f"warming {i + 1}/{len(shapes)}: {shape.width}x{shape.height} x{shape.batch}, {shape.steps} steps")

        first = _timed_run(engine, shape)
        steady = _timed_run(engine, shape) if engine.compiled else first  # a compiled shape's first run compiles
        timings[f"{shape.width}x{shape.height}x{shape.batch}@{shape.steps}"] = {"first_s": round(first, 4),
                                                                              "steady_s": round(steady, 4)}
    return timings


class _WorkerBase:
    def __init__(self, spec: EngineSpec, name: str, warm: list[WarmShape]):
        self.spec = spec
        self.name = name
        self.warm_shapes = warm
        self.state = "starting"
        self.detail = "starting"
        self.busy = False
        self.assigned_slots = 0  # images in the batch it is running (for least-loaded choice)
        self.warm_timings: dict = {}
        self.restarts = 0

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _report(self, detail: str) -> None:
        self.detail = detail


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
        self.warm_timings = await loop.run_in_executor(self._executor, _warm, self.engine, self.warm_shapes,
                                                       self._report)
        self.state, self.detail = "ready", "ready"

    async def run(self, req: BatchRequest) -> BatchOutput:
        return await asyncio.get_running_loop().run_in_executor(self._executor, _run_batch, self.engine, req)

    async def restart(self) -> None:
        await self.start()

    async def stop(self) -> None:
        warming = self.state != "ready"
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
        timings = _warm(engine, warm, lambda detail: conn.send(("progress", detail)))
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
                self.warm_timings = payload
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

    def _roundtrip(self, req: BatchRequest) -> BatchOutput:
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
        ready = self.state == "ready"
        self.state, self.detail = "stopped", "stopped"
        if ready and self._conn is not None and self._process is not None and self._process.is_alive():
            try:  # a ready child finishes its batch and exits; a warming one is not listening: killed at once
                self._conn.send(None)
                await asyncio.to_thread(self._process.join, 10)
            except OSError:
                pass
        await asyncio.to_thread(self._terminate)
        self._executor.shutdown(wait=False, cancel_futures=True)
