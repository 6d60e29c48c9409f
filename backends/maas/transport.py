"""A lean HTTP/1.1 transport for httpx: keep-alive connections over asyncio streams, parsed by httptools.

httpx's default pool checks every pooled connection's socket on every request (a
select() each); on the gateway's hot path that bookkeeping cost more than the
request itself (docs/benchmarks.md). This transport keeps one stack of idle
connections per origin and touches only the one it uses. Bodies are read whole,
up to `max_body_bytes`. Behind httpx's two-method transport interface, so
clients, timeouts, errors and tests (respx) work as before.

TLS verifies against a CA bundle (the provider's `ca_bundle`, else SSL_CERT_FILE, else the system's), with
one SSL context for the transport's life. Proxies come from the environment as httpx reads them
(HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, NO_PROXY): https through a CONNECT tunnel, http in absolute form.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import urllib.request
from collections import defaultdict

import httptools
import httpx

__all__ = ["FastTransport", "origin_of", "ssl_context"]


def ssl_context(ca_bundle: str | os.PathLike | None = None) -> ssl.SSLContext:
    """Verifying TLS: against `ca_bundle`, else SSL_CERT_FILE / SSL_CERT_DIR, else the system's CAs."""
    cafile = ca_bundle or os.environ.get("SSL_CERT_FILE") or None
    capath = None if cafile else os.environ.get("SSL_CERT_DIR") or None
    return ssl.create_default_context(cafile=cafile, capath=capath)


def _proxy_for(scheme: str, host: str, proxies: dict[str, str]) -> httpx.URL | None:
    """The proxy the environment names for this origin (None: go direct), as httpx's trust_env reads it."""
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return httpx.URL(url if "://" in url else f"http://{url}")


def origin_of(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


class _Reply:
    def __init__(self, limit: int):
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []  # joined once at the end: appending to a bytearray copied twice
        self.size = 0
        self.done = False
        self.limit = limit

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            raise httpx.RemoteProtocolError(f"response body over {self.limit} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class _Stale(Exception):
    """The server had closed this kept-alive connection: nothing was answered, so a retry is safe."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    @property
    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    async def exchange(self, head: bytes, body: bytes, limit: int) -> tuple[_Reply, bool]:
        self.writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.writer.write(body)
        await self.writer.drain()
        reply = _Reply(limit)
        parser = httptools.HttpResponseParser(reply)
        received = False
        while not reply.done:
            try:
                data = await self.reader.read(1 << 20)  # big answers (2 MB of base64) in few reads
            except ConnectionResetError as exc:
                if not received:
                    raise _Stale() from exc
                raise
            if not data:
                if not received:
                    raise _Stale()
                raise httpx.RemoteProtocolError("server closed the connection before the response ended")
            received = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise httpx.RemoteProtocolError(f"malformed HTTP response: {exc}") from exc
        reply.status = parser.get_status_code()
        # HTTP/1.1 keeps the connection unless the server says otherwise (httptools resets its own flag
        # once the message completes).
        closing = any(k.lower() == b"connection" and b"close" in v.lower() for k, v in reply.headers)
        return reply, parser.get_http_version() == "1.1" and not closing


class FastTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 100, max_idle_per_origin: int = 64,
                 max_body_bytes: int = 64 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 ca_bundle: str | os.PathLike | None = None, trust_env: bool = True):
        self._idle: dict[tuple, list[_Connection]] = defaultdict(list)
        self._slots: dict[tuple, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(max_connections))
        self._max_idle = max_idle_per_origin
        self._limit = max_body_bytes
        self._ssl = ssl_context
        self._ca_bundle = ca_bundle
        # Read once, as httpx does at client creation: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY.
        self._proxies = urllib.request.getproxies_environment() if trust_env else {}
        self._absolute_form: set[tuple] = set()  # http origins reached through a proxy

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:  # built once: loading a CA bundle costs milliseconds
            self._ssl = ssl_context(self._ca_bundle)
        return self._ssl

    async def _connect(self, origin: tuple, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        context = self._context() if scheme == "https" else None
        proxy = _proxy_for(scheme, host, self._proxies)
        try:
            async with asyncio.timeout(timeout):
                if proxy is None:
                    reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                                   server_hostname=host if context else None)
                else:
                    reader, writer = await self._through(proxy, origin, context)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connect to {host}:{port} timed out") from exc
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connect to {host}:{port} failed: {exc}") from exc
        return _Connection(reader, writer)

    async def _through(self, proxy: httpx.URL, origin: tuple, context: ssl.SSLContext | None):
        """A connection to `origin` by way of `proxy`: a CONNECT tunnel for https (TLS end to end with the
        origin), the proxy itself for http (requests then go in absolute form)."""
        scheme, host, port = origin
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port or 80)
        if scheme != "https":
            self._absolute_form.add(origin)
            return reader, writer
        auth = b""
        if proxy.username:
            token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode())
            auth = b"Proxy-Authorization: Basic %s\r\n" % token
        target = f"{host}:{port}".encode()
        writer.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, auth))
        await writer.drain()
        status_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        parts = status_line.split()
        if len(parts) < 2 or parts[1] != b"200":
            writer.close()
            raise httpx.ProxyError(f"proxy {proxy.host} refused CONNECT {host}:{port}: "
                                   f"{status_line.decode('latin-1').strip()}")
        await writer.start_tls(context, server_hostname=host)
        return reader, writer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        body = await request.aread()
        head = b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path) + b"".join(
            b"%s: %s\r\n" % (k, v) for k, v in request.headers.raw) + b"\r\n"
        reply = await self.exchange(origin_of(url), head, body, request.extensions.get("timeout", {}))
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body, request=request)

    async def exchange(self, origin: tuple[str, str, int], head: bytes, body: bytes, timeouts: dict) -> _Reply:
        """One request (`head`: request line and headers, ending in a blank line) on a kept-alive
        connection to `origin` (scheme, host, port); the reply read whole. Errors are httpx's."""
        if origin in self._absolute_form or (origin[0] == "http" and self._proxies and
                                             _proxy_for("http", origin[1], self._proxies)):
            head = _absolute(head, origin)
        slots = self._slots[origin]
        if slots.locked():  # a timer only when it has to wait: asyncio.timeout costs a scheduled handle
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError as exc:
                raise httpx.PoolTimeout("no connection slot free before the pool timeout") from exc
        else:
            await slots.acquire()
        try:
            return await self._exchange(origin, head, body, timeouts)
        finally:
            slots.release()

    async def _exchange(self, origin: tuple, head: bytes, body: bytes, timeouts: dict) -> _Reply:
        idle = self._idle[origin]
        for attempt in (0, 1):  # a kept-alive connection the server already closed: one fresh retry
            reused = False
            conn = None
            while idle and conn is None:
                candidate = idle.pop()
                if candidate.usable:
                    conn, reused = candidate, True
                else:
                    candidate.close()
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    reply, keep_alive = await conn.exchange(head, body, self._limit)
            except TimeoutError as exc:
                conn.close()
                raise httpx.ReadTimeout("no response before the read timeout") from exc
            except _Stale as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise httpx.RemoteProtocolError("server closed the connection without answering") from exc
            except httpx.RemoteProtocolError:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                raise httpx.ReadError(str(exc)) from exc
            except BaseException:  # cancelled mid-exchange: the connection's state is unknown
                conn.close()
                raise
            if keep_alive and len(idle) < self._max_idle:
                idle.append(conn)
            else:
                conn.close()
            return reply
        raise httpx.RemoteProtocolError("connection failed twice")

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _absolute(head: bytes, origin: tuple) -> bytes:
    """The request line in absolute form (GET http://host:port/path HTTP/1.1), as an http proxy wants it."""
    line, sep, rest = head.partition(b"\r\n")
    method, target, version = line.split(b" ", 2)
    if target.startswith(b"/"):
        scheme, host, port = origin
        target = f"{scheme}://{host}:{port}".encode() + target
    return b" ".join((method, target, version)) + sep + rest
