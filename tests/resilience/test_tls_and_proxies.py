"""Real networks: providers are HTTPS and companies reach them through egress proxies. The lean transport
verifies TLS against a configurable CA bundle and honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY as httpx does."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme
from PIL import Image
from pydantic import SecretStr

from backends.errors import BackendTransientError
from backends.maas import OpenAIImagesBackend, ProviderConfig
from backends.protocol import GenerationJob

JOB = GenerationJob(id="j1", prompt="p", width=64, height=64)


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class _Images(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        _Images.seen.append(self.path)
        body = json.dumps({"created": 1, "data": [{"b64_json": _png()}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def _serve(server: ThreadingHTTPServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def tls_upstream(ca):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = _serve(server).split(":")[1]
    yield f"https://localhost:{port}/v1"
    server.shutdown()


@pytest.fixture
def http_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    yield f"http://{_serve(server)}/v1"
    server.shutdown()


class _Proxy:
    """An egress proxy: CONNECT tunnels, and plain http forwarded as sent (absolute form)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connects: list[str] = []
        self.forwards: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)
        line = head.split(b"\r\n", 1)[0].decode()
        method, target, _ = line.split(" ")
        if method == "CONNECT":
            self.connects.append(target)
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection(("127.0.0.1" if host == "localhost" else host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = head.split(b"\r\n\r\n", 1)[1]
        else:
            self.forwards.append(target)
            hostport = target.split("://", 1)[1].split("/", 1)[0]
            host, port = hostport.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            rest = head
        if rest:
            upstream.sendall(rest)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.listener.close()


@pytest.fixture
def proxy():
    p = _Proxy()
    yield p
    p.close()


@pytest.fixture(params=["fast", "aiohttp"])
def transport(request):
    return request.param


def backend(base_url: str, transport: str, **kw) -> OpenAIImagesBackend:
    return OpenAIImagesBackend(ProviderConfig(name="images", base_url=base_url, api_key=SecretStr("k"), model="m",
                                              transport=transport, **kw))


def soon() -> float:
    return time.monotonic() + 10


async def test_tls_verifies_against_the_configured_ca_bundle(tls_upstream, ca, tmp_path, transport):
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    got = await backend(tls_upstream, transport, ca_bundle=str(bundle)).generate(JOB, soon())
    assert got.images[0].content()[:4] == b"\x89PNG"


async def test_tls_refuses_a_certificate_no_trusted_ca_signed(tls_upstream, monkeypatch, transport):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(BackendTransientError, match="ConnectError"):
        await backend(tls_upstream, transport).generate(JOB, soon())


async def test_ssl_cert_file_names_the_bundle_when_the_provider_does_not(tls_upstream, ca, tmp_path, monkeypatch,
                                                                       transport):
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert (await backend(tls_upstream, transport).generate(JOB, soon())).images


async def test_https_goes_through_the_proxy_as_a_connect_tunnel(tls_upstream, ca, tmp_path, proxy, monkeypatch,
                                                                transport):
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    got = await backend(tls_upstream, transport, ca_bundle=str(bundle)).generate(JOB, soon())
    assert got.images and proxy.connects == [tls_upstream.split("//")[1].split("/")[0]]  # TLS end to end


async def test_no_proxy_sends_matching_hosts_direct(tls_upstream, ca, tmp_path, proxy, monkeypatch, transport):
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert (await backend(tls_upstream, transport, ca_bundle=str(bundle)).generate(JOB, soon())).images
    assert proxy.connects == []


async def test_plain_http_goes_through_the_proxy_in_absolute_form(http_upstream, proxy, monkeypatch, transport):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    b = backend(http_upstream, transport)
    for _ in range(2):  # the second on the kept-alive connection through the proxy
        assert (await b.generate(JOB, soon())).images
    assert proxy.forwards and proxy.forwards[0] == http_upstream + "/images/generations"
