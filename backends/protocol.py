"""The one small protocol every backend implements, and the values that cross it."""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from policies.types import BackendKind, Health, PoolModel, SizeSupport

__all__ = [
    "Backend",
    "GeneratedImage",
    "GenerationJob",
    "GenerationResult",
    "LoadReport",
    "Offer",
]


@dataclass(frozen=True, slots=True)
class Offer:
    """What a backend can do: static for its lifetime."""

    name: str
    kind: BackendKind
    models: tuple[str, ...]
    sizes: SizeSupport
    max_n: int
    default_steps: int = 30
    sandbox: bool = False
    gpu_hour_usd: float | None = None  # local pools: what an hour of their device costs


@dataclass(frozen=True, slots=True)
class LoadReport:
    """How a backend is doing right now; cheap to read, never does I/O."""

    health: Health
    detail: str = ""
    pool: PoolModel | None = None  # local pools: profile, work ahead, workers, occupancy, price


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One request's work, in our own terms; each backend maps it to its wire format."""

    id: str
    prompt: str
    width: int
    height: int
    n: int = 1
    model: str | None = None
    steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    quality: str | None = None
    output_format: str = "png"
    response_format: str = "b64_json"  # what the client wants: providers that return URLs fetch for b64_json
    # A backend that queues gives the job back unstarted (BackendReleased) if, by this monotonic time, it
    # predicts a late finish: the dispatcher's next candidate can still make the deadline. None: keep it.
    start_by: float | None = None
    # Only this backend can serve it in time: a pool that pre-empts runs it ahead of flexible work, pausing a
    # running batch of such work after its current step (policies' Candidate.preempts).
    preempts: bool = False


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """Image bytes, or a URL where the provider keeps them (the gateway fetches or stores)."""

    data: bytes | None = None
    url: str | None = None
    media_type: str = "image/png"
    b64: str | None = None  # the provider's own base64 text, kept so b64_json answers skip re-encoding
    # Or the provider's JSON string literal of it, quotes included (a msgspec.Raw over the answer's bytes,
    # without escapes): b64_json answers embed it unchanged, so the text is neither decoded nor re-encoded.
    b64_literal: Any = None

    @property
    def present(self) -> bool:
        """Bytes or base64 in hand (not only a URL still to fetch)."""
        return self.data is not None or self.b64 is not None or self.b64_literal is not None

    def _base64(self):
        return self.b64 if self.b64 is not None else memoryview(self.b64_literal)[1:-1]

    def content(self) -> bytes | None:
        """The image bytes: `data`, or the provider's base64 decoded now (2 ms per 2 MB: only when needed)."""
        if self.data is None and (self.b64 is not None or self.b64_literal is not None):
            return binascii.a2b_base64(self._base64())
        return self.data

    def head(self, size: int = 65536) -> bytes | None:
        """The first ~`size` bytes, enough for the header (width and height) without decoding all of it."""
        if self.data is None and (self.b64 is not None or self.b64_literal is not None):
            return binascii.a2b_base64(self._base64()[: size // 3 * 4])
        return self.data


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    model: str
    width: int
    height: int
    gpu_seconds: float | None = None  # local pool: device time this job used
    provider_request_id: str | None = None
    billed_units: float | None = None
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A place images are made. Knows nothing of policy."""

    @property
    def offer(self) -> Offer: ...

    def load(self) -> LoadReport: ...

    async def start(self) -> None: ...

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        """Make `job.n` images before `deadline` (a time.monotonic() value) or raise BackendError."""
        ...

    async def aclose(self) -> None: ...
