"""POST /v1/images/generations and the stored-image files behind url responses."""

from __future__ import annotations

import msgspec
from litestar import Request, get, post
from litestar.response import File
from litestar.types import Receive, Scope, Send

from ..errors import GatewayError, NotFound
from ..image_store import ImageStore
from ..service import GenerationService, RequestContext
from .jobs import idempotency_key, idempotent

__all__ = ["create_image", "get_image_file"]


class _JSONAnswer:
    """The 200 answer as a bare ASGI app: Litestar's Response -> ASGIResponse conversion (header objects,
    cookies, media-type resolution) was the largest single framework cost per request (docs/benchmarks.md).
    Errors still go through Litestar's exception handlers."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: bytes, headers: dict[str, str], status: int = 200):
        self.body = body
        self.status = status
        self.headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body)),
                        *((k.encode(), v.encode()) for k, v in headers.items())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


@post("/v1/images/generations", status_code=200, summary="Create images (OpenAI-compatible)",
      response_description="The images (b64_json or url), OpenAI's shape; routing in x-gateway-* headers")
async def create_image(request: Request, service: GenerationService) -> _JSONAnswer:
    ctx = RequestContext(base_url_of=lambda: str(request.base_url))
    try:
        ctx.tenant = request.app.state.keyring.app(request.headers.get("authorization")).tenant
    except GatewayError as exc:
        service.record_rejection(ctx, exc)  # refused requests are audited too
        raise
    jobs = request.app.state.jobs
    try:
        key = idempotency_key(request) if jobs is not None else None
    except GatewayError as exc:
        service.record_rejection(ctx, exc)
        raise
    if key is None:
        served = await service.generate(await request.body(), ctx)
        return _JSONAnswer(msgspec.json.encode(served.body), served.headers)
    body = await request.body()

    async def run() -> tuple[int, dict[str, str], bytes]:
        served = await service.generate(body, ctx)
        return 200, served.headers, msgspec.json.encode(served.body)

    status, headers, answer = await idempotent(jobs, ctx.tenant, key, body, run,
                                               refused=lambda exc: service.record_rejection(ctx, exc),
                                               replayed=lambda original: service.record_replay(ctx, original))
    return _JSONAnswer(answer, headers, status)


@get("/v1/images/files/{name:str}", summary="Fetch an image returned as a url")
async def get_image_file(name: str, image_store: ImageStore) -> File:
    found = image_store.locate(name)
    if found is None:
        raise NotFound("image not found or expired", param="name")
    path, media_type = found
    return File(path=path, filename=name, media_type=media_type, content_disposition_type="inline",
                headers={"cache-control": "private, max-age=3600"})
