"""POST /v1/images/generations and the stored-image files behind url responses."""

from __future__ import annotations

import msgspec
from litestar import Request, get, post
from litestar.response import File
from litestar.types import Receive, Scope, Send

from ..errors import GatewayError, NotFound
from ..image_store import ImageStore
from ..service import GenerationService, RequestContext

__all__ = ["create_image", "get_image_file"]


class _JSONAnswer:
    """The 200 answer as a bare ASGI app: Litestar's Response -> ASGIResponse conversion (header objects,
    cookies, media-type resolution) was the largest single framework cost per request (docs/benchmarks.md).
    Errors still go through Litestar's exception handlers."""

    __slots__ = ("body", "headers")

    def __init__(self, body: dict, headers: dict[str, str]):
        self.body = msgspec.json.encode(body)
        self.headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body)),
                        *((k.encode(), v.encode()) for k, v in headers.items())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
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
    served = await service.generate(await request.body(), ctx)
    return _JSONAnswer(served.body, served.headers)


@get("/v1/images/files/{name:str}", summary="Fetch an image returned as a url")
async def get_image_file(name: str, image_store: ImageStore) -> File:
    found = image_store.locate(name)
    if found is None:
        raise NotFound("image not found or expired", param="name")
    path, media_type = found
    return File(path=path, filename=name, media_type=media_type, content_disposition_type="inline",
                headers={"cache-control": "private, max-age=3600"})
