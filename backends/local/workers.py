"""GPU workers: one engine each, in this process (a thread) or in a child process per GPU.

A worker runs one batch at a time. A child process that dies mid-batch raises
`WorkerCrashed` to the pool, which re-queues the batch's jobs and restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing as mp
import threading
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


def _run_batch(engine: DiffusionEngine, req: BatchRequest, encode: bool = False, *, pauses=None,
               nested: bool = False) -> BatchOutput:
    """Generate a batch. Its images come back as host pixels for the caller to encode while this worker runs its
    next batch (GPU JPEG, a few ms, is done here), or encoded when `encode` is set. With `pauses` (a callable
    that runs waiting batches and returns the seconds they took), it is called between denoising steps and the
    time it took is left out of this batch's `seconds` (timings["paused_s"])."""
    started = time.perf_counter()
    paused = [0.0]

    def between_steps() -> None:
        paused[0] += pauses()

    images = engine.generate(req.prompts, width=req.width, height=req.height, steps=req.steps, seeds=req.seeds,
                             negative_prompts=req.negative_prompts, guidance_scale=req.guidance_scale,
                             output_type="uint8", between_steps=between_steps if pauses else None, nested=nested)
    timings = {"paused_s": round(paused[0], 4)} if paused[0] else {}
    if encode or encodes_on_device(images, req.output_format):
        return BatchOutput(encode_batch(images, req.output_format), time.perf_counter() - started - paused[0],
                           timings=timings)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    return BatchOutput([], time.perf_counter() - started - paused[0], timings=timings, pixels=pixels,
                       output_format=req.output_format)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Resolve a future from the event loop's thread (a caller that gave up has cancelled it)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


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

    async def run_paused(self, req: BatchRequest) -> BatchOutput:
        """Run a batch inside the pausable one running now, after its current step (`_hand_over`, under the
        worker's lock while `_pausable`); with none running (it has just ended), next on this worker."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            taken = self._pausable
            if taken:
                self._hand_over(req, future)
        return await (future if taken else self.run(req))

    def _hand_over(self, req: BatchRequest, future: asyncio.Future) -> None:  # pragma: no cover - per kind
        raise NotImplementedError


class ThreadWorker(_WorkerBase):
    """The engine in this process, run on one dedicated thread (CPU, or a single GPU)."""

    pauses = True  # runs a batch between the denoising steps of a running one (run_paused)

    def __init__(self, spec: EngineSpec, name: str = "worker-0", warm: list[WarmShape] | None = None,
                 engine: DiffusionEngine | None = None):
        super().__init__(spec, name, warm or [])
        self.engine = engine or DiffusionEngine(spec)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pausable = False  # a pausable batch is running and will take `_waiting` between its steps
        self._waiting: list[tuple[BatchRequest, asyncio.Future, asyncio.AbstractEventLoop]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.state = "warming"
        if self.engine.pipe is None:
            self.detail = "loading pipeline"
            await loop.run_in_executor(self._executor, self.engine.load)
        timings = await loop.run_in_executor(self._executor, _warm, self.engine, self.warm_shapes[:1], self._report)
        self._first_warmed(timings)
        self.state, self.detail = "ready", "ready"

    async def run(self, req: BatchRequest, *, pausable: bool = False) -> BatchOutput:
        """Run a batch; a `pausable` one runs the batches `run_paused` hands it between its denoising steps."""
        loop = asyncio.get_running_loop()
        if not pausable:
            return await loop.run_in_executor(self._executor, _run_batch, self.engine, req)
        return await loop.run_in_executor(self._executor, self._run_pausable, req)

    def _hand_over(self, req: BatchRequest, future: asyncio.Future) -> None:
        self._waiting.append((req, future, future.get_loop()))

    def _run_pausable(self, req: BatchRequest) -> BatchOutput:
        with self._lock:
            self._pausable = True
        try:
            return _run_batch(self.engine, req, pauses=self._run_waiting)
        finally:
            with self._lock:
                self._pausable = False
            self._run_waiting()  # handed over after its last step: run before it is handed back

    def _run_waiting(self) -> float:
        started = time.perf_counter()
        while True:
            with self._lock:
                if not self._waiting:
                    return time.perf_counter() - started
                req, future, loop = self._waiting.pop(0)
            try:
                output = _run_batch(self.engine, req, nested=True)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, output)

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
        if isinstance(message, tuple) and message[0] == "nested":  # came after the batch it was for had ended
            _run_nested(engine, conn, message)
            continue
        try:
            if isinstance(message, WarmShape):
                conn.send(("ok", _warm_one(engine, message, lambda detail: None)))
            elif isinstance(message, tuple) and message[0] == "pausable":
                conn.send(("ok", _run_batch(engine, message[1], pauses=lambda: _run_nested_waiting(engine, conn))))
            else:
                conn.send(("ok", _run_batch(engine, message)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _run_nested_waiting(engine: DiffusionEngine, conn) -> float:
    """Between two steps of a pausable batch: run the batches the parent has sent meanwhile."""
    started = time.perf_counter()
    while conn.poll():
        _run_nested(engine, conn, conn.recv())
    return time.perf_counter() - started


def _run_nested(engine: DiffusionEngine, conn, message) -> None:
    _, ident, req = message
    try:
        conn.send(("nested", ident, "ok", _run_batch(engine, req, nested=True)))
    except Exception as exc:
        conn.send(("nested", ident, "error", f"{type(exc).__name__}: {exc}"))


class ProcessWorker(_WorkerBase):
    """The engine in a child process (one per GPU); a crash is detected and reported, never hangs the pool."""

    pauses = True  # runs a batch between the denoising steps of a running one (run_paused)

    def __init__(self, spec: EngineSpec, name: str, warm: list[WarmShape] | None = None):
        super().__init__(spec, name, warm or [])
        self._ctx = mp.get_context("spawn")
        self._process = None
        self._conn = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pausable = False  # the child runs a pausable batch: a batch sent now runs between its steps
        self._nested: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}  # sent, not answered
        self._ids = itertools.count()

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

    def _roundtrip(self, req, pausable: bool = False):
        try:
            self._conn.send(("pausable", req) if pausable else req)
        except (OSError, BrokenPipeError) as exc:
            raise WorkerCrashed(f"worker {self.name} is gone") from exc
        if pausable:
            with self._lock:
                self._pausable = True  # only now: a batch sent meanwhile would interleave with ours on the pipe
        try:
            result = None
            while result is None or self._nested:  # a batch sent after our last step is answered after ours
                message = self._recv()
                if message[0] == "nested":
                    self._answer_nested(*message[1:])
                    continue
                with self._lock:
                    self._pausable = False
                result = message
        finally:
            with self._lock:
                self._pausable = False
                lost, self._nested = self._nested, {}
            for future, loop in lost.values():  # the child died: those batches never finish here
                loop.call_soon_threadsafe(_settle, future, None, WorkerCrashed(f"worker {self.name} died"))
        kind, payload = result
        if kind == "ok":
            return payload
        raise RuntimeError(payload)

    def _answer_nested(self, ident: int, kind: str, payload) -> None:
        with self._lock:
            future, loop = self._nested.pop(ident)
        error = None if kind == "ok" else RuntimeError(payload)
        loop.call_soon_threadsafe(_settle, future, payload if error is None else None, error)

    async def run(self, req: BatchRequest, *, pausable: bool = False) -> BatchOutput:
        """Run a batch; a `pausable` one runs the batches `run_paused` sends it between its denoising steps."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._roundtrip, req, pausable)
        except WorkerCrashed:
            self.state, self.detail = "crashed", "crashed; restarting"
            raise

    def _hand_over(self, req: BatchRequest, future: asyncio.Future) -> None:
        ident = next(self._ids)
        self._nested[ident] = (future, future.get_loop())
        try:  # sent from the event loop's thread only, never beside the batch's own send
            self._conn.send(("nested", ident, req))
        except (OSError, BrokenPipeError) as exc:
            del self._nested[ident]
            raise WorkerCrashed(f"worker {self.name} is gone") from exc

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
