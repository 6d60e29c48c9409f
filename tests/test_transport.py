"""The lean HTTP/1.1 transport behaves like httpx's own where the gateway relies on it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from backends.maas.transport import FastTransport


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    return head + (await reader.readexactly(length) if length else b"")


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection_and_chunked_bodies_are_read():
    connections = 0

    async def handler(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()

    server, port = await serve(handler)
    async with httpx.AsyncClient(transport=FastTransport(), base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(5):
            r = await client.post("/x", json={"a": 1})
            assert r.status_code == 200 and r.text == "hello world"
    assert connections == 1
    server.close()


async def test_a_connection_the_server_closed_is_replaced_transparently():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(answer(b"ok"))  # keep-alive promised, then the server goes away
        await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with httpx.AsyncClient(transport=FastTransport(), base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get("/")).text == "ok"
        await asyncio.sleep(0.05)
        assert (await client.get("/")).text == "ok"
    server.close()


async def test_timeouts_refusals_and_oversized_bodies_are_httpx_errors():
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    server, port = await serve(silent)
    async with httpx.AsyncClient(transport=FastTransport(), timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"http://127.0.0.1:{port}/")
    server.close()

    async def big(reader, writer):
        await read_request(reader)
        writer.write(answer(b"x" * 5000))
        await writer.drain()

    server, port = await serve(big)
    async with httpx.AsyncClient(transport=FastTransport(max_body_bytes=1000)) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:1/")
    server.close()


async def test_connections_per_origin_are_capped():
    active = peak = 0

    async def slow(reader, writer):
        nonlocal active, peak
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.02)
            active -= 1
            writer.write(answer(b"ok"))
            await writer.drain()

    server, port = await serve(slow)
    async with httpx.AsyncClient(transport=FastTransport(max_connections=4)) as client:
        await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/") for _ in range(20)))
    assert peak <= 4
    server.close()


async def test_provider_calls_skip_the_client_layer_but_keep_its_url_headers_and_json():
    import time

    from backends.maas._http import send

    seen: list[bytes] = []

    async def handler(reader, writer):
        seen.append(await read_request(reader))
        writer.write(answer(b'{"ok": true}', b"content-type: application/json\r\n"))
        await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with httpx.AsyncClient(transport=FastTransport(), base_url=f"http://127.0.0.1:{port}/v1",
                                 headers={"authorization": "Bearer client", "x-fixed": "1"}) as client:
        r = await send(client, "POST", "/images/generations", time.monotonic() + 5, json={"prompt": "fox"},
                       headers={"Authorization": "Bearer call"})
    server.close()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /v1/images/generations http/1.1"
    assert b"authorization: bearer call" in lines and b"authorization: bearer client" not in lines
    assert b"x-fixed: 1" in lines and b"content-type: application/json" in lines
    assert body == b'{"prompt":"fox"}' or body.replace(b" ", b"") == b'{"prompt":"fox"}'
    assert r.status_code == 200 and r.json() == {"ok": True} and r.url.endswith("/v1/images/generations")
    assert r.headers.get("Content-Type") == "application/json" and r.reason_phrase == "OK"


async def test_the_direct_path_reads_replies_as_httpx_would():
    import gzip
    import time

    from backends.maas._http import send

    seen: list[bytes] = []
    replies = [
        answer(b"{}", b"x-a: 1\r\nX-A: 2\r\nretry-after: 3\r\n").replace(b"200 OK", b"429 Too Many Requests"),
        answer(gzip.compress(b'{"zipped": true}'), b"content-encoding: gzip\r\n"),
    ]

    async def handler(reader, writer):
        for reply in replies:
            seen.append(await read_request(reader))
            writer.write(reply)
            await writer.drain()
        writer.close()

    server, port = await serve(handler)
    async with httpx.AsyncClient(transport=FastTransport(), base_url=f"http://127.0.0.1:{port}") as client:
        limited = await send(client, "GET", "/status/1", time.monotonic() + 5)
        zipped = await send(client, "POST", "/x", time.monotonic() + 5, content=b"raw")
    server.close()
    assert limited.status_code == 429 and limited.reason_phrase == "Too Many Requests"
    assert limited.headers.get("X-A") == "1, 2" and limited.headers["Retry-After"] == "3"
    assert b"content-length" not in seen[0].lower()  # a GET without a body says nothing of one, as httpx
    assert zipped.json() == {"zipped": True}  # compressed bodies are decoded
    assert seen[1].endswith(b"\r\n\r\nraw") and b"content-length: 3" in seen[1].lower()
