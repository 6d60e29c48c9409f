"""aiohttp's client (pooling, TLS and proxies in C and well-kept Python) behind httpx's transport interface:
`transport: aiohttp`, measured side by side with the lean transport (docs/benchmarks.md, gateway_overhead).

`exchange()` is the direct path `_http.send` takes (no httpx Request/Response objects), as it does for the
lean transport, so the two are compared on equal terms.
"""

from __future__ import annotations

import os

import httpx

from .transport import ssl_context

__all__ = ["AiohttpTransport"]


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes):
        self.status, self.headers, self.body = status, headers, body


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, max_body_bytes: int = 64 * 1024 * 1024,
                 ca_bundle: str | os.PathLike | None = None):
        self._limit, self._max, self._ca_bundle = max_connections, max_body_bytes, ca_bundle
        self._session = None

    def _client(self):
        if self._session is None:  # made inside the running loop, as aiohttp requires
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self._limit, ssl=ssl_context(self._ca_bundle))
            self._session = aiohttp.ClientSession(connector=connector, trust_env=True, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def exchange(self, method: str, url: str, headers: list[tuple[bytes, bytes]], body: bytes,
                       timeouts: dict) -> _Reply:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.get("connect"), sock_read=timeouts.get("read"))
        try:
            async with self._client().request(method, url, data=body or None, timeout=timeout,
                                              headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                                       for k, v in headers]) as resp:
                if resp.content_length and resp.content_length > self._max:
                    raise httpx.RemoteProtocolError(f"response body over {self._max} bytes")
                data = await resp.content.read(self._max + 1)
                if len(data) > self._max:
                    raise httpx.RemoteProtocolError(f"response body over {self._max} bytes")
                return _Reply(resp.status, list(resp.raw_headers), data)
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout("no response before the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        reply = await self.exchange(request.method, str(request.url), list(request.headers.raw), await request.aread(),
                                    request.extensions.get("timeout", {}))
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
