"""Test doubles that implement the Backend protocol honestly (no patching)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

from PIL import Image

from backends.errors import BackendError
from backends.protocol import GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer
from policies.types import BackendKind, Health, SizeSupport


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
            return LoadReport(self.health, ms_per_unit=10.0, gpu_seconds_per_unit=0.01)
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
