"""Test doubles that implement the Backend protocol honestly (no patching)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

from PIL import Image

from backends.errors import BackendError
from backends.protocol import GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer
from policies.profile import ThroughputProfile
from policies.types import BackendKind, Health, PoolModel, SizeSupport


def png(width: int = 8, height: int = 8, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class ScriptedBackend:
    """Answers after `delay_s` with PNGs, or raises what `fail` returns for a job."""

    def __init__(self, name: str, *, kind: BackendKind = BackendKind.API, delay_s: float = 0.0,
                 fail: Callable[[GenerationJob], BackendError | None] | None = None,
                 health: Health = Health.OK, max_n: int = 10, models: tuple[str, ...] = ("m1",),
                 sizes: SizeSupport = SizeSupport()):
        self._offer = Offer(name=name, kind=kind, models=models, sizes=sizes, max_n=max_n,
                            default_steps=4, gpu_hour_usd=2.0 if kind is BackendKind.LOCAL else None)
        self.delay_s = delay_s
        self.fail = fail
        self.health = health
        self.calls: list[GenerationJob] = []
        self.closed = False

    @property
    def offer(self) -> Offer:
        return self._offer

    def load(self) -> LoadReport:
        if self._offer.kind is BackendKind.LOCAL:
            profile = ThroughputProfile(prior_fixed_s=0.0, prior_unit_s=0.01)
            return LoadReport(self.health, pool=PoolModel(profile, self._offer.models[0], gpu_hour_usd=2.0))
        return LoadReport(self.health)

    async def start(self) -> None:
        pass

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        self.calls.append(job)
        await asyncio.sleep(self.delay_s)
        if self.fail is not None and (error := self.fail(job)) is not None:
            raise error
        images = tuple(GeneratedImage(png(job.width // 8 or 1, job.height // 8 or 1)) for _ in range(job.n))
        return GenerationResult(images=images, model=job.model or self._offer.models[0],
                                width=job.width, height=job.height,
                                gpu_seconds=0.05 if self._offer.kind is BackendKind.LOCAL else None)

    async def aclose(self) -> None:
        self.closed = True


class FakeWorker:
    """A pool worker without a GPU: a batch takes `seconds(batch_size)`; records every batch it ran."""

    def __init__(self, name: str = "fake-0", seconds=lambda b: 0.05 + 0.01 * b, fail_on: str | None = None,
                 warm: list | None = None, warm_seconds: float = 0.01):
        self.name = name
        self.seconds = seconds
        self.fail_on = fail_on
        self.warm_shapes, self.warm_seconds = list(warm or []), warm_seconds
        self.warmed, self.pending_warm = [], []
        self.state, self.detail = "starting", "starting"
        self.busy = False
        self.assigned_slots = 0
        self.warm_timings: dict = {}
        self.batches: list = []
        self.restarts = 0

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self.warmed, self.pending_warm = self.warm_shapes[:1], self.warm_shapes[1:]
        self.state, self.detail = "ready", "ready"

    async def warm_next(self):
        shape = self.pending_warm[0]
        await asyncio.sleep(self.warm_seconds)
        self.pending_warm.remove(shape)
        self.warmed.append(shape)
        return shape

    async def run(self, req):
        from backends.local.workers import BatchOutput

        self.batches.append(req)
        seconds = self.seconds(len(req.prompts))
        await asyncio.sleep(seconds)
        if self.fail_on and self.fail_on in req.prompts:
            raise RuntimeError("CUDA error: out of memory (fake)")
        return BatchOutput([png(4, 4) for _ in req.prompts], seconds)

    async def restart(self) -> None:
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        self.state = "stopped"
