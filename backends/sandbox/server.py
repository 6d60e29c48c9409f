"""One server emulating Seedream, Gemini image, Reve and Bria over HTTP, with injectable faults.

Each provider sits under its own prefix and validates requests the way the real
API does (auth header, required fields, allowed values), answers in its real
response and error shapes (Bria asynchronously), and returns deterministic
placeholder PNGs. Faults follow `SandboxConfig`, changeable at run time with
PUT /_sandbox/config. Images are labelled SANDBOX.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import secrets
import time
from collections import Counter
from typing import Any

from litestar import Litestar, Request, Response, get, post, put
from litestar.datastructures import State

from ..maas.bria import ASPECT_RATIOS as BRIA_RATIOS
from ..maas.gemini import ASPECT_RATIOS as GEMINI_RATIOS
from ..maas.reve import ASPECT_RATIOS as REVE_RATIOS
from .faults import SandboxConfig, Verdict, draw
from .images import placeholder_png

__all__ = ["create_sandbox_app"]

_TIER_EDGE = {"1K": 1024, "2K": 2048, "4K": 4096}


def _ratio_size(ratio: str, megapixels: float) -> tuple[int, int]:
    w, h = (float(x) for x in ratio.split(":"))
    height = math.sqrt(megapixels * 1_000_000 * h / w)
    return int(height * w / h) // 8 * 8, int(height) // 8 * 8


class _Sandbox:
    def __init__(self, config: SandboxConfig):
        self.config = config
        self.rng = random.Random(config.seed)
        self.files: dict[str, bytes] = {}
        self.bria_jobs: dict[str, dict[str, Any]] = {}
        self.stats: Counter[str] = Counter()

    def verdict(self, provider: str) -> Verdict:
        self.stats[f"{provider}.requests"] += 1
        v = draw(self.config.profile(provider), self.rng)
        if v.fault:
            self.stats[f"{provider}.{v.fault}"] += 1
        return v

    async def wait(self, provider: str, verdict: Verdict) -> None:
        seconds = self.config.profile(provider).hang_s if verdict.fault == "hang" else verdict.latency_s
        await asyncio.sleep(seconds)

    def keep(self, data: bytes, base_url: str) -> str:
        name = secrets.token_urlsafe(16) + ".png"
        self.files[name] = data
        if len(self.files) > 2000:  # bounded memory
            self.files.pop(next(iter(self.files)))
        return f"{base_url.rstrip('/')}/files/{name}"


def _json(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body, status_code=status, headers=headers or {})


def _malformed() -> Response:
    return Response(b'{"data": [{"b64_json": "iVBORw0KGgo', status_code=200, media_type="application/json")


async def _body(request: Request) -> dict | None:
    try:
        data = await request.json()
    except Exception:
        return None
    return data if isinstance(data, dict) else None


# --- Seedream ---------------------------------------------------------------

def _seedream_error(status: int, code: str, message: str, param: str | None = None, **headers) -> Response:
    return _json({"error": {"code": code, "message": f"{message} Request ID: sbx-{secrets.token_hex(6)}",
                            "param": param, "type": "BadRequest" if status == 400 else code}}, status, headers)


@post("/seedream/api/v3/images/generations")
async def seedream_generate(request: Request, state: State) -> Response:
    sbx: _Sandbox = state.sandbox
    if not request.headers.get("authorization", "").startswith("Bearer "):
        return _seedream_error(401, "AuthenticationError", "missing or invalid API key")
    body = await _body(request)
    if body is None:
        return _seedream_error(400, "InvalidParameter", "body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # the official SDK sends null for unset fields
    for key in ("model", "prompt"):
        if not body.get(key):
            return _seedream_error(400, "MissingParameter", f"the parameter `{key}` is required", key)
    try:
        width, height = (int(x) for x in str(body.get("size", "2048x2048")).lower().split("x"))
    except ValueError:
        return _seedream_error(400, "InvalidParameter", "size must be WxH", "size")
    if not (1024 * 1024 <= width * height <= 4096 * 4096) or not (1 / 16 <= width / height <= 16):
        return _seedream_error(400, "InvalidParameter", "size out of the allowed pixel range", "size")
    if body.get("response_format", "url") not in ("url", "b64_json"):
        return _seedream_error(400, "InvalidParameter", "response_format", "response_format")
    v = sbx.verdict("seedream")
    await sbx.wait("seedream", v)
    if v.fault == "error":
        return _seedream_error(500, "InternalServiceError", "internal error")
    if v.fault == "rate_limit":
        return _seedream_error(429, "RateLimitExceeded.EndpointRPMExceeded", "rate limited",
                               **{"retry-after": str(sbx.config.seedream.retry_after_s)})
    if v.fault == "malformed":
        return _malformed()
    if v.fault == "content_violation":
        return _seedream_error(400, "OutputImageSensitiveContentDetected", "output image may be sensitive")
    png = placeholder_png("seedream", body["prompt"], body.get("seed"), width, height)
    item = ({"b64_json": base64.b64encode(png).decode()} if body.get("response_format") == "b64_json"
            else {"url": sbx.keep(png, str(request.base_url))})
    return _json({"model": body["model"], "created": int(time.time()), "data": [{**item, "size": f"{width}x{height}"}],
                  "usage": {"generated_images": 1, "output_tokens": width * height // 256,
                            "total_tokens": width * height // 256}},
                 headers={"x-request-id": f"sbx-{secrets.token_hex(8)}"})


# --- Gemini -----------------------------------------------------------------

def _google_error(code: int, status: str, message: str, details: list | None = None) -> Response:
    return _json({"error": {"code": code, "message": message, "status": status, "details": details or []}}, code)


@post("/gemini/{version:str}/models/{target:str}")
async def gemini_generate(request: Request, state: State, version: str, target: str) -> Response:
    sbx: _Sandbox = state.sandbox
    model, _, method = target.partition(":")
    if method != "generateContent":
        return _google_error(404, "NOT_FOUND", f"method {method!r} not found")
    if not request.headers.get("x-goog-api-key") and not request.query_params.get("key"):
        return _google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
    body = await _body(request)
    try:
        text = body["contents"][0]["parts"][0]["text"]
        assert isinstance(text, str) and text
    except (TypeError, KeyError, IndexError, AssertionError):
        return _google_error(400, "INVALID_ARGUMENT", "contents[0].parts[0].text is required")
    image_config = (body.get("generationConfig") or {}).get("imageConfig") or {}
    ratio, tier = image_config.get("aspectRatio", "1:1"), image_config.get("imageSize", "1K")
    if ratio not in GEMINI_RATIOS or tier not in _TIER_EDGE:
        return _google_error(400, "INVALID_ARGUMENT", "unsupported aspectRatio or imageSize")
    v = sbx.verdict("gemini")
    await sbx.wait("gemini", v)
    if v.fault == "error":
        return _google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    if v.fault == "rate_limit":
        return _google_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted", [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{sbx.config.gemini.retry_after_s}s"}])
    if v.fault == "malformed":
        return _malformed()
    if v.fault == "content_violation":
        return _json({"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "IMAGE_SAFETY"}],
                      "modelVersion": model, "responseId": secrets.token_hex(6)})
    w, h = (float(x) for x in ratio.split(":"))
    edge = _TIER_EDGE[tier] if "pro" in model else 1024
    width, height = (edge, int(edge * h / w)) if w >= h else (int(edge * w / h), edge)
    seed = (body.get("generationConfig") or {}).get("seed")
    data = base64.b64encode(placeholder_png("gemini", text, seed, width, height)).decode()
    return _json({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "Here is your image."}, {"inlineData": {"mimeType": "image/png", "data": data}}]},
        "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1120, "totalTokenCount": 1129},
        "modelVersion": model, "responseId": secrets.token_hex(6)})


# --- Reve -------------------------------------------------------------------

def _reve_error(status: int, code: str, message: str, **headers) -> Response:
    return _json({"error_code": code, "message": message, "instance_id": secrets.token_hex(4)}, status, headers)


@post("/reve/v1/image/create")
async def reve_create(request: Request, state: State) -> Response:
    sbx: _Sandbox = state.sandbox
    if not request.headers.get("authorization", "").startswith("Bearer "):
        return _reve_error(401, "UNAUTHORIZED", "invalid token")
    body = await _body(request)
    if body is None or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return _reve_error(400, "PROMPT_REQUIRED", "prompt is required")
    if len(body["prompt"]) > 4000:
        return _reve_error(400, "PROMPT_TOO_LONG", "prompt exceeds 4000 characters")
    ratio = body.get("aspect_ratio", "3:2")
    if ratio not in (*REVE_RATIOS, "auto"):
        return _reve_error(400, "INVALID_PARAMETER_VALUE", "aspect_ratio")
    v = sbx.verdict("reve")
    await sbx.wait("reve", v)
    if v.fault == "error":
        return _reve_error(500, "INTERNAL_ERROR", "internal error")
    if v.fault == "rate_limit":
        return _reve_error(429, "RATE_LIMITED", "too many requests",
                           **{"retry-after": str(sbx.config.reve.retry_after_s)})
    if v.fault == "malformed":
        return _malformed()
    width, height = _ratio_size("3:2" if ratio == "auto" else ratio, 1.0)
    violation = v.fault == "content_violation"
    png = b"" if violation else placeholder_png("reve", body["prompt"], None, width, height)
    meta = {"x-reve-request-id": f"rsid-{secrets.token_hex(6)}", "x-reve-credits-used": "18",
            "x-reve-credits-remaining": "982", "x-reve-version": "reve-create@sandbox",
            "x-reve-content-violation": str(violation).lower()}
    if request.headers.get("accept", "").startswith("image/"):  # the SDK's way: raw bytes, metadata in headers
        return Response(png, media_type="image/png", headers=meta)
    return _json({"image": base64.b64encode(png).decode(), "version": meta["x-reve-version"],
                  "content_violation": violation, "request_id": meta["x-reve-request-id"], "credits_used": 18,
                  "credits_remaining": 982}, headers=meta)


# --- Bria -------------------------------------------------------------------

def _bria_error(status: int, message: str, **headers) -> Response:
    return _json({"request_id": secrets.token_hex(8), "error": {"code": status, "message": message,
                                                              "details": ""}}, status, headers)


@post("/bria/v2/image/generate")
async def bria_generate(request: Request, state: State) -> Response:
    sbx: _Sandbox = state.sandbox
    if not request.headers.get("api_token"):
        return _bria_error(401, "missing api_token header")
    body = await _body(request)
    if body is None or not isinstance(body.get("prompt"), str) or not body["prompt"]:
        return _bria_error(400, "prompt is required")
    ratio = body.get("aspect_ratio", "1:1")
    if ratio not in BRIA_RATIOS or body.get("resolution", "1MP") not in ("1MP", "4MP"):
        return _bria_error(400, "invalid aspect_ratio or resolution")
    v = sbx.verdict("bria")
    if v.fault == "rate_limit":
        return _bria_error(429, "rate limit exceeded", **{"retry-after": str(sbx.config.bria.retry_after_s)})
    if v.fault == "error":
        await sbx.wait("bria", v)
        return _bria_error(503, "service unavailable")
    if v.fault == "content_violation":
        return _bria_error(422, "prompt failed content moderation")
    request_id = secrets.token_hex(8)
    width, height = _ratio_size(ratio, 4.0 if body.get("resolution") == "4MP" else 1.0)
    png = placeholder_png("bria", body["prompt"], body.get("seed"), width, height)
    job = {"ready_at": time.monotonic() + v.latency_s, "fault": v.fault, "png": png, "seed": body.get("seed")}
    sbx.bria_jobs[request_id] = job
    base = str(request.base_url).rstrip("/")
    if body.get("sync"):
        await sbx.wait("bria", v)
        return _json(_bria_status(sbx, request_id, base))
    return _json({"request_id": request_id, "status_url": f"{base}/bria/v2/status/{request_id}"}, 202)


def _bria_status(sbx: _Sandbox, request_id: str, base: str) -> dict:
    job = sbx.bria_jobs[request_id]
    if job["fault"] == "hang" or time.monotonic() < job["ready_at"]:
        return {"request_id": request_id, "status": "IN_PROGRESS"}
    if job["fault"] in ("job_error", "malformed"):
        return {"request_id": request_id, "status": "ERROR",
                "error": {"code": 500, "message": "generation failed", "details": ""}}
    url = job.get("url") or sbx.keep(job["png"], base)
    job["url"] = url
    return {"request_id": request_id, "status": "COMPLETED",
            "result": {"image_url": url, "seed": job["seed"], "structured_prompt": "{}"}}


@get("/bria/v2/status/{request_id:str}")
async def bria_status(request: Request, state: State, request_id: str) -> Response:
    sbx: _Sandbox = state.sandbox
    if not request.headers.get("api_token"):
        return _bria_error(401, "missing api_token header")
    if request_id not in sbx.bria_jobs:
        return _bria_error(404, "unknown request_id")
    return _json(_bria_status(sbx, request_id, str(request.base_url)))


# --- Files and control --------------------------------------------------------

@get("/files/{name:str}")
async def get_file(state: State, name: str) -> Response:
    data = state.sandbox.files.get(name)
    if data is None:
        return _json({"error": "not found"}, 404)
    return Response(data, media_type="image/png")


@get("/_sandbox/config")
async def get_config(state: State) -> dict:
    return state.sandbox.config.model_dump()


@put("/_sandbox/config")
async def put_config(request: Request, state: State) -> dict:
    state.sandbox.config = SandboxConfig.model_validate(await request.json())
    return state.sandbox.config.model_dump()


@get("/_sandbox/stats")
async def get_stats(state: State) -> dict:
    return dict(state.sandbox.stats)


def create_sandbox_app(config: SandboxConfig | None = None) -> Litestar:
    """The four providers' emulators in one ASGI app."""
    return Litestar(
        route_handlers=[seedream_generate, gemini_generate, reve_create, bria_generate, bria_status, get_file,
                        get_config, put_config, get_stats],
        state=State({"sandbox": _Sandbox(config or SandboxConfig())}),
        openapi_config=None,
        logging_config=None,
    )
