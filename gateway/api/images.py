"""POST /v1/images/generations and the stored-image files behind url responses."""

from __future__ import annotations

from litestar import Request, Response, get, post
from litestar.response import File

from ..errors import GatewayError, NotFound
from ..image_store import ImageStore
from ..service import GenerationService, RequestContext

__all__ = ["create_image", "get_image_file"]


@post("/v1/images/generations", status_code=200, summary="Create images (OpenAI-compatible)")
async def create_image(request: Request, service: GenerationService) -> Response:
    ctx = RequestContext(base_url_of=lambda: str(request.base_url))
    try:
        ctx.tenant = request.app.state.keyring.app(request.headers.get("authorization")).tenant
    except GatewayError as exc:
        service.record_rejection(ctx, exc)  # refused requests are audited too
        raise
    served = await service.generate(await request.body(), ctx)
    return Response(served.body, headers=served.headers)


@get("/v1/images/files/{name:str}", summary="Fetch an image returned as a url")
async def get_image_file(name: str, image_store: ImageStore) -> File:
    found = image_store.locate(name)
    if found is None:
        raise NotFound("image not found or expired", param="name")
    path, media_type = found
    return File(path=path, media_type=media_type, content_disposition_type="inline",
                headers={"cache-control": "private, max-age=3600"})
