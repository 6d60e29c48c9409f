"""What every per-request API backend shares: config, error translation, image fetches."""

from __future__ import annotations

import binascii
import email.utils
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from pydantic import SecretStr

from ..errors import (
    BackendAuthError,
    BackendError,
    BackendRateLimited,
    BackendRequestRejected,
    BackendTimeout,
    BackendTransientError,
    ContentRefused,
)
from .transport import FastTransport, origin_of, ssl_context

__all__ = [
    "ProviderConfig",
    "decode_keeping_literals",
    "error_for_status",
    "image_size",
    "is_string",
    "parse_images_json",
    "parse_json",
    "parse_json_keeping",
    "remaining",
    "retry_after_seconds",
    "send",
]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider connection: where, with which key, which model, how long to wait."""

    name: str
    base_url: str
    api_key: SecretStr | None
    model: str
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    max_download_bytes: int = 32 * 1024 * 1024
    max_n: int = 10
    sandbox: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    transport: str = "fast"  # fast: backends.maas.transport (lean keep-alive pool); httpx: httpx's own
    ca_bundle: str | None = None  # CA certificates (PEM) to verify the provider; default SSL_CERT_FILE, else system

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    def make_client(self, **headers: str) -> httpx.AsyncClient:
        """One pooled client per backend, for its whole life."""
        transport = None
        if self.transport == "aiohttp":
            from .transport_aiohttp import AiohttpTransport

            transport = AiohttpTransport(max_connections=100, max_body_bytes=self.max_download_bytes + 1024 * 1024,
                                         ca_bundle=self.ca_bundle)
        elif self.transport == "fast":
            transport = FastTransport(max_connections=100, max_body_bytes=self.max_download_bytes + 1024 * 1024,
                                      ca_bundle=self.ca_bundle)
        return httpx.AsyncClient(base_url=self.base_url.rstrip("/"), timeout=self.timeout(), headers=headers,
                                 limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                                 transport=transport, verify=ssl_context(self.ca_bundle))


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise BackendTimeout("deadline passed before the call")
    return left


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), or Google's '30s' retryDelay."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value.removesuffix("s")))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(status: int, message: str, *, code: str | None = None, retry_after_s: float | None = None,
                     content: bool = False) -> BackendError:
    """The one mapping from a provider's HTTP status to our error tree."""
    kw = {"status": status, "provider_code": code}
    if content:
        return ContentRefused(message, **kw)
    if status == 429:
        return BackendRateLimited(message, retry_after_s=retry_after_s, **kw)
    if status in (401, 402, 403):
        return BackendAuthError(message, **kw)
    if status in (408, 409) or status >= 500:
        return BackendTransientError(message, **kw)
    return BackendRequestRejected(message, **kw)


def parse_json(response: httpx.Response) -> Any:
    """The body as JSON; malformed or truncated bodies are transient failures, never crashes."""
    try:
        return msgspec.json.decode(response.content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BackendTransientError(
            f"malformed JSON from provider (HTTP {response.status_code}, {len(response.content)} bytes)",
            status=response.status_code) from exc


def decode_keeping_literals(response: httpx.Response, decoder: msgspec.json.Decoder) -> Any | None:
    """The body through `decoder` (a msgspec schema whose base64 fields are msgspec.Raw), or None where it
    must take parse_json: an escape anywhere (one may sit inside a literal), another shape (a
    ValidationError is a DecodeError) or a malformed body (parse_json says which)."""
    if b"\\" in response.content:
        return None
    try:
        return decoder.decode(response.content)
    except msgspec.DecodeError:
        return None


class _ImagesAnswer(msgspec.Struct):
    """OpenAI's images answer ({"data": [{"b64_json" | "url": ...}], ...}) with each item's values raw."""

    data: list[dict[str, msgspec.Raw]] | None = None
    created: Any = None
    model: Any = None
    usage: Any = None


_IMAGES_ANSWER = msgspec.json.Decoder(_ImagesAnswer)


def parse_images_json(response: httpx.Response) -> Any:
    """An OpenAI-shaped answer as parse_json gives it, except that each item's `b64_json` stays the
    provider's JSON string literal (msgspec.Raw): found in one pass, never decoded to a str, and embedded
    unchanged in b64_json answers (decoding and re-encoding 2 MB of base64 cost ~1 ms a request). Bodies
    with escapes, or of another shape, are parsed as parse_json does."""
    answer = decode_keeping_literals(response, _IMAGES_ANSWER)
    if answer is None:
        return parse_json(response)
    payload = {k: v for k in ("created", "model", "usage") if (v := getattr(answer, k)) is not None}
    if answer.data is not None:
        payload["data"] = [{k: v if k == "b64_json" and is_string(v) else msgspec.json.decode(v)
                            for k, v in item.items()} for item in answer.data]
    return payload


_FLAT_ANSWER = msgspec.json.Decoder(dict[str, msgspec.Raw])


def parse_json_keeping(response: httpx.Response, key: str) -> Any:
    """A JSON object as parse_json gives it, except that the string under top-level `key` stays the
    provider's literal (msgspec.Raw), as parse_images_json keeps `b64_json`: for flat answers (Reve's)."""
    top = decode_keeping_literals(response, _FLAT_ANSWER)
    if top is None:
        return parse_json(response)
    return {k: v if k == key and is_string(v) else msgspec.json.decode(v) for k, v in top.items()}


def is_string(raw: msgspec.Raw) -> bool:
    return len(raw) > 2 and memoryview(raw)[0] == 0x22  # a non-empty JSON string


async def send(client: httpx.AsyncClient, method: str, url: str, deadline: float, **kw) -> httpx.Response:
    """One HTTP call bounded by the deadline; transport failures become our errors."""
    timeout = min(remaining(deadline), client.timeout.read or 1e9)
    try:
        if hasattr(client._transport, "exchange") and kw.keys() <= _DIRECT_KWARGS:
            return await _send_direct(client, method, url, httpx.Timeout(timeout, connect=min(timeout, 10.0)), **kw)
        return await client.request(method, url, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), **kw)
    except httpx.TimeoutException as exc:
        raise BackendTimeout(f"{type(exc).__name__} after {timeout:.1f}s") from exc
    except httpx.TransportError as exc:
        raise BackendTransientError(f"transport error: {type(exc).__name__}") from exc


_DIRECT_KWARGS = frozenset({"json", "headers", "content"})


class DirectResponse:
    """What the provider modules read of an httpx.Response (status, headers, body), built straight from the
    parsed reply: httpx's Request and Response objects (header normalisation, byte streams, decoders) cost
    more than the proxying itself on the gateway's hot path (docs/benchmarks.md)."""

    __slots__ = ("content", "headers", "status_code", "url")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes, url: str):
        self.status_code, self.content, self.url = status, content, url
        self.headers = _Headers()
        for name, value in headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    @property
    def reason_phrase(self) -> str:
        return httpx.codes.get_reason_phrase(self.status_code)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Headers(dict):
    """Case-insensitive lookups over lower-cased names, as httpx.Headers answers them."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _request_head(client: httpx.AsyncClient, method: str, url: str,
                  headers: dict[str, str] | None) -> tuple[tuple[str, str, int], str, bytes]:
    """(origin, URL, request line and headers but the body's) for this call, built once per distinct call:
    a provider's calls differ only in their bodies. Headers as httpx would send them: Host first, the
    client's, then the call's replacing the client's of the same name."""
    heads = client.__dict__.setdefault("_imagegw_heads", {})
    key = (method, url, tuple(headers.items()) if headers else ())
    cached = heads.get(key)
    if cached is None:
        target = client._merge_url(url)
        merged = list(client.headers.raw)
        if headers:
            override = {k.lower().encode() for k in headers}
            merged = [(k, v) for k, v in merged if k.lower() not in override] + \
                [(k.encode(), v.encode()) for k, v in headers.items()]
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode(), target.raw_path),
                 b"Host: %s\r\n" % target.netloc, *(b"%s: %s\r\n" % (k, v) for k, v in merged)]
        if len(heads) >= 256:  # calls whose headers vary (request ids) must not grow it without bound
            heads.clear()
        cached = heads[key] = (origin_of(target), str(target), b"".join(lines))
    return cached


async def _send_direct(client: httpx.AsyncClient, method: str, url: str, timeout: httpx.Timeout, *,
                       json: Any = None, headers: dict[str, str] | None = None,
                       content: bytes | None = None) -> DirectResponse | httpx.Response:
    """The request straight to the lean transport. httpx's client layer (URL merging and parsing, cookie
    jar, auth and redirect flows) and its Request/Response objects were over a quarter of the gateway's
    CPU per proxied call; provider APIs need none of it: a fixed URL per backend, no cookies, no redirects."""
    if not isinstance(client._transport, FastTransport):
        return await _send_aiohttp(client, method, url, timeout, json=json, headers=headers, content=content)
    origin, target, head = _request_head(client, method, url, headers)
    if json is not None:
        body = msgspec.json.encode(json)
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    else:
        body = content or b""
        # as httpx: a GET without a body says nothing of its length
        head += (b"Content-Length: %d\r\n\r\n" % len(body)) if body or method in _BODY_METHODS else b"\r\n"
    reply = await client._transport.exchange(origin, head, body, timeout.as_dict())
    if any(k.lower() == b"content-encoding" and v.strip().lower() != b"identity" for k, v in reply.headers):
        # Compressed (the client accepts what httpx can decode): let httpx decode it.
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body,
                              request=httpx.Request(method, target))
    return DirectResponse(reply.status, reply.headers, reply.body, target)


async def _send_aiohttp(client: httpx.AsyncClient, method: str, url: str, timeout: httpx.Timeout, *,
                        json: Any = None, headers: dict[str, str] | None = None,
                        content: bytes | None = None) -> DirectResponse | httpx.Response:
    """The direct path over aiohttp's client: the same headers as the lean path, no httpx objects."""
    heads = client.__dict__.setdefault("_imagegw_aio_heads", {})
    key = (url, tuple(headers.items()) if headers else ())
    cached = heads.get(key)
    if cached is None:
        merged = list(client.headers.raw)
        if headers:
            override = {k.lower().encode() for k in headers}
            merged = [(k, v) for k, v in merged if k.lower() not in override] + \
                [(k.encode(), v.encode()) for k, v in headers.items()]
        if len(heads) >= 256:
            heads.clear()
        cached = heads[key] = (str(client._merge_url(url)), merged)
    target, merged = cached
    body = msgspec.json.encode(json) if json is not None else (content or b"")
    if json is not None:
        merged = [*merged, (b"Content-Type", b"application/json")]
    reply = await client._transport.exchange(method, target, merged, body, timeout.as_dict())
    if any(k.lower() == b"content-encoding" and v.strip().lower() != b"identity" for k, v in reply.headers):
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body,
                              request=httpx.Request(method, target))
    return DirectResponse(reply.status, reply.headers, reply.body, target)


async def download_image(client: httpx.AsyncClient, url: str, deadline: float, max_bytes: int) -> bytes:
    """Fetch a provider's image URL, refusing bodies over max_bytes."""
    timeout = remaining(deadline)
    try:
        async with client.stream("GET", url, timeout=timeout) as response:
            if response.status_code != 200:
                raise error_for_status(response.status_code, f"image download failed: HTTP {response.status_code}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise BackendTransientError(f"image is {declared} bytes, over the {max_bytes} cap")
            buf = bytearray()
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise BackendTransientError(f"image exceeds the {max_bytes} byte cap")
            return bytes(buf)
    except httpx.TimeoutException as exc:
        raise BackendTimeout("image download timed out") from exc
    except httpx.TransportError as exc:
        raise BackendTransientError(f"image download failed: {type(exc).__name__}") from exc


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from an image's header (no full decode); None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def decode_b64(value: str, provider: str) -> bytes:
    """Base64 image bytes, or a transient error naming the provider (never a crash)."""
    import base64
    import binascii

    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BackendTransientError(f"{provider} returned invalid base64 image data") from exc


def error_json(response: httpx.Response) -> dict:
    """A provider's error body as a dict; {} when it is not JSON (error paths never raise)."""
    try:
        body = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def b64_image(value: str | msgspec.Raw, provider: str, media_type: str = "image/png"):
    """An image from provider base64, kept as the provider's text (b64_json answers pass it through): a str,
    or the JSON string literal itself (from parse_images_json)."""
    from ..protocol import GeneratedImage

    if isinstance(value, msgspec.Raw):
        text = memoryview(value)[1:-1]
        if len(text) % 4 or not _ends_decode(text):
            raise BackendTransientError(f"{provider} returned invalid base64 image data")
        return GeneratedImage(media_type=media_type, b64_literal=value)
    if not isinstance(value, str) or len(value) % 4 or not _ends_decode(value):
        raise BackendTransientError(f"{provider} returned invalid base64 image data")
    return GeneratedImage(media_type=media_type, b64=value)


def _ends_decode(value, span: int = 4096) -> bool:
    """Its first and last `span` characters are strict base64: catches truncation and wrong payloads
    without decoding megabytes the client will receive as base64 anyway (the bytes are decoded only
    when needed: a url answer, an image size)."""
    try:
        binascii.a2b_base64(value[:span], strict_mode=True)
        binascii.a2b_base64(value[-span:] if len(value) > span else b"", strict_mode=True)
        return bool(len(value))
    except (binascii.Error, ValueError):
        return False
