"""The shared shape of a per-request API backend: n parallel calls, URL fetches, key checks.

A provider module subclasses `ApiBackend` and implements `create()` (one image,
its wire format, its errors); everything else is here once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from policies.types import BackendKind, Health, SizeSupport

from ..errors import BackendRequestRejected, BackendTransientError, BackendUnavailable
from ..protocol import GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer
from ._http import ProviderConfig, download_image, image_size, send

__all__ = ["ApiBackend", "Pace", "Piece"]

Pace = Callable[[float], Awaitable[None]]  # waits for an upstream call's turn before `deadline`, or raises


@dataclass(frozen=True, slots=True)
class Piece:
    """One image from one provider call, with what the provider said about it."""

    image: GeneratedImage
    width: int | None = None
    height: int | None = None
    request_id: str | None = None
    billed_units: float | None = None
    model: str | None = None


class ApiBackend:
    """Base for provider backends; subclasses set `sizes` and implement `create` and `auth_headers`."""

    sizes: SizeSupport = SizeSupport(min_side=64, max_side=4096)
    # Hosts image links may be fetched from besides the upstream's own (options.image_hosts replaces it).
    default_image_hosts: tuple[str, ...] = ()

    def __init__(self, config: ProviderConfig, client: httpx.AsyncClient | None = None):
        self.config = config
        self._client = client
        self._owns_client = client is None
        self._offer = Offer(name=config.name, kind=BackendKind.API, models=(config.model,), sizes=self.sizes,
                            max_n=config.max_n, sandbox=config.sandbox)
        self.pace: Pace | None = None  # injected: every upstream call takes a turn (each of n, submits, polls)

    @property
    def offer(self) -> Offer:
        return self._offer

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self.config.make_client()
        return self._client

    def load(self) -> LoadReport:
        if self.config.api_key is None:
            return LoadReport(Health.UNCONFIGURED, detail="no API key (set the variable named by api_key_env)")
        return LoadReport(Health.OK, detail="sandbox" if self.config.sandbox else "ready")

    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    async def call(self, method: str, url: str, deadline: float, **kw) -> httpx.Response:
        """One upstream API call, after its turn under the backend's pacing."""
        if self.pace is not None:
            await self.pace(deadline)
        return await send(self.client, method, url, deadline, **kw)

    def image_host_allowed(self, url: str) -> bool:
        """Image links are fetched only from the upstream's own host or the `image_hosts` allow-list
        (glob patterns, e.g. "*.cloudfront.net"): a provider's answer must not make us fetch anything else."""
        try:
            target = httpx.URL(url)
        except Exception:
            return False
        if target.scheme not in ("http", "https") or not target.host:
            return False
        if target.host == httpx.URL(self.config.base_url).host:
            return True
        patterns = self.config.options.get("image_hosts", self.default_image_hosts)
        return any(fnmatch.fnmatch(target.host, p) for p in patterns)

    async def fetch_image(self, url: str, deadline: float) -> bytes:
        """An image link's bytes (size-capped, deadline-bounded), for b64_json answers."""
        if not self.image_host_allowed(url):
            raise BackendRequestRejected(
                f"{self.config.name} answered with an image link on a host not allowed "
                "(the upstream's own, or options.image_hosts)")
        data = await download_image(self.client, url, deadline, self.config.max_download_bytes)
        if not data:
            raise BackendTransientError(f"{self.config.name}: the image link returned no bytes")
        return data

    async def create(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        """One provider call for image `index` of the job."""
        raise NotImplementedError

    async def generate(self, job: GenerationJob, deadline: float) -> GenerationResult:
        if self.config.api_key is None:
            raise BackendUnavailable(f"{self.config.name} has no API key")
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the sibling calls
                tasks = [group.create_task(self._one(job, i, deadline)) for i in range(job.n)]
        except BaseExceptionGroup as group_error:
            raise _first_leaf(group_error) from None
        pieces = [t.result() for t in tasks]
        first = pieces[0]
        billed = [p.billed_units for p in pieces if p.billed_units is not None]
        return GenerationResult(
            images=tuple(p.image for p in pieces),
            model=first.model or self.config.model,
            width=first.width or job.width,
            height=first.height or job.height,
            provider_request_id=",".join(p.request_id for p in pieces if p.request_id) or None,
            billed_units=sum(billed) if billed else None,
            extra={"sandbox": True} if self.config.sandbox else {},
        )

    async def _one(self, job: GenerationJob, index: int, deadline: float) -> Piece:
        if job.seed is not None and index:
            job = dataclasses.replace(job, seed=job.seed + index)
        piece = await self.create(job, index, deadline)
        if not piece.image.present and job.response_format == "b64_json" and piece.image.url:
            data = await self.fetch_image(piece.image.url, deadline)
            piece = dataclasses.replace(piece, image=GeneratedImage(data=data, url=piece.image.url,
                                                                   media_type=piece.image.media_type))
        if piece.width is None and piece.image.present and (size := image_size(piece.image.head())):
            piece = dataclasses.replace(piece, width=size[0], height=size[1])
        return piece


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
