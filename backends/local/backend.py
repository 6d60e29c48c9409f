"""The local diffusion pool as a Backend: a FIFO of jobs run one at a time on one engine.

Work is measured in units of steps x megapixels x images; the pool learns its
speed (ms per unit) from every job it runs, so the policy's latency and cost
predictions follow what the hardware actually does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from policies.types import BackendKind, Health, SizeSupport

from ..errors import BackendTimeout, BackendTransientError, BackendUnavailable
from ..protocol import GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer
from .engine import DiffusionEngine, EngineSpec, encode_image
from .presets import PRESETS

__all__ = ["LocalPoolBackend", "work_units"]

log = logging.getLogger(__name__)

_EWMA = 0.3  # weight of the newest observation in the speed estimate


def work_units(width: int, height: int, steps: int, n: int) -> float:
    return steps * width * height / 1_000_000 * n


class LocalPoolBackend:
    """Runs jobs on a `DiffusionEngine` in a single worker thread, in arrival order."""

    def __init__(
        self,
        engine: DiffusionEngine,
        *,
        name: str = "local",
        max_n: int = 10,
        gpu_hour_usd: float = 2.0,
        warmup: bool = True,
    ):
        preset = PRESETS.get(engine.spec.preset, PRESETS["sdxl"])
        self._engine = engine
        self._offer = Offer(
            name=name,
            kind=BackendKind.LOCAL,
            models=(engine.spec.preset if engine.spec.weights_dir is None else engine.spec.weights_dir.name,),
            sizes=SizeSupport(min_side=preset.min_side, max_side=preset.max_side,
                              multiple_of=preset.multiple_of),
            max_n=max_n,
            default_steps=engine.default_steps,
            gpu_hour_usd=gpu_hour_usd,
        )
        self._warmup = warmup
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-engine")
        self._health = Health.WARMING
        self._detail = "loading pipeline"
        self._ms_per_unit: float | None = None
        self._pending_units = 0.0
        self._start_task: asyncio.Task | None = None

    @classmethod
    def from_spec(cls, spec: EngineSpec, **kw) -> LocalPoolBackend:
        return cls(DiffusionEngine(spec), **kw)

    @property
    def offer(self) -> Offer:
        return self._offer

    def load(self) -> LoadReport:
        speed = self._ms_per_unit
        return LoadReport(
            health=self._health,
            detail=self._detail,
            ms_per_unit=speed,
            queue_ms=self._pending_units * speed if speed else 0.0,
            gpu_seconds_per_unit=speed / 1000.0 if speed else None,
            has_headroom=self._pending_units == 0,
        )

    async def start(self) -> None:
        """Load (and warm) the engine in the background; health says WARMING until done."""
        self._start_task = asyncio.create_task(self._load_and_warm())

    async def wait_ready(self) -> None:
        if self._start_task is not None:
            await asyncio.shield(self._start_task)

    async def _load_and_warm(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._engine.load)
            if self._warmup:
                self._detail = "warming up"
                side = PRESETS.get(self._engine.spec.preset, PRESETS["tiny"]).native_size
                steps = self._engine.default_steps
                seconds = await loop.run_in_executor(
                    self._executor, self._run_timed, ["warm-up"], side, side, steps, [0]
                )
                self._ms_per_unit = seconds * 1000 / work_units(side, side, steps, 1)
            self._health, self._detail = Health.OK, "ready"
        except Exception as exc:  # the pool stays down; the gateway keeps routing elsewhere
            log.exception("local pool failed to start")
            self._health, self._detail = Health.UNCONFIGURED, f"failed to load: {exc}"

    def _run_timed(self, prompts, width, height, steps, seeds, negative=None) -> float:
        started = time.perf_counter()
        self._engine.generate(prompts, width=width, height=height, steps=steps, seeds=seeds,
                              negative_prompts=negative)
        return time.perf_counter() - started

    def _run_job(self, job: GenerationJob, steps: int, deadline: float):
        if time.monotonic() >= deadline:
            raise BackendTimeout("deadline passed while queued")
        seed = job.seed if job.seed is not None else int.from_bytes(job.id.encode()[:4], "big")
        started = time.perf_counter()
        images = self._engine.generate(
            [job.prompt] * job.n,
            width=job.width,
            height=job.height,
            steps=steps,
            seeds=[seed + i for i in range(job.n)],
            negative_prompts=[job.negative_prompt] * job.n if job.negative_prompt else None,
            guidance_scale=job.guidance_scale,
        )
        seconds = time.perf_counter() - started
        encoded = tuple(
            GeneratedImage(encode_image(img, job.output_format), media_type=f"image/{job.output_format}")
            for img in images
        )
        return encoded, seconds

    def _observe(self, units: float, seconds: float) -> None:
        observed = seconds * 1000 / units
        prev = self._ms_per_unit
        self._ms_per_unit = observed if prev is None else (1 - _EWMA) * prev + _EWMA * observed

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        if self._health is not Health.OK:
            raise BackendUnavailable(f"local pool is {self._health.value}: {self._detail}")
        steps = job.steps or self._offer.default_steps
        units = work_units(job.width, job.height, steps, job.n)
        self._pending_units += units
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._run_job, job, steps, deadline)
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
                images, seconds = await future
        except TimeoutError as exc:
            raise BackendTimeout("local pool did not finish before the deadline") from exc
        except BackendTimeout:
            raise
        except Exception as exc:
            log.exception("local generation failed")
            raise BackendTransientError(f"local generation failed: {type(exc).__name__}") from exc
        finally:
            self._pending_units -= units
        self._observe(units, seconds)
        return GenerationResult(
            images=images, model=self._offer.models[0], width=job.width, height=job.height,
            gpu_seconds=seconds,
        )

    async def aclose(self) -> None:
        self._health, self._detail = Health.UNCONFIGURED, "closed"
        self._executor.shutdown(wait=False, cancel_futures=True)
