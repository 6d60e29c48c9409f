"""No secret leaves the process: an upstream that echoes our key in its error body reaches no client, audit
record, status page or log line with it."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from gateway.audit import open_reader
from gateway.redact import REDACTED, Redactor
from gateway.settings import ProviderSettings
from policies.schema import Policy

KEY = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"


class _EchoingUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that fails and quotes the request's headers back (some do)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"error": {"message": f"upstream failed; request headers were: {dict(self.headers)}",
                                     "type": "server_error", "code": "internal"}}).encode()
        status = 401 if "auth" in self.path else 500
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echoing_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_redactor_removes_configured_keys_and_credential_shaped_tokens():
    redact = Redactor(["my-configured-key-value"])
    text = ("key my-configured-key-value, Authorization: Bearer abc.def.ghijklmnop, x-goog-api-key: "
            "AIzaSyD-abcdefghijklmnopqrstuvwxyz12345, {'api_token': 'tok_123456789'}, sk-proj-ABCDEFGHIJKLMNOPQRST")
    out = redact(text)
    for secret in ("my-configured-key-value", "abc.def.ghijklmnop", "AIzaSyD", "tok_123456789", "sk-proj-ABC"):
        assert secret not in out
    assert out.count(REDACTED) == 5 and "x-goog-api-key" in out and "api_token" in out  # names stay
    assert redact("HTTP 500: internal error, try again") == "HTTP 500: internal error, try again"


@pytest.mark.parametrize("path", ["/v1", "/auth/v1"])
def test_an_upstream_echoing_our_key_never_shows_it(path, settings, serve, echoing_upstream, monkeypatch, caplog):
    monkeypatch.setenv("ECHO_KEY", KEY)
    settings.local.enabled = False
    settings.backends = {"echo": ProviderSettings(kind="openai", base_url=echoing_upstream + path,
                                                  api_key_env="ECHO_KEY", model="m", timeout_s=5)}
    policy = Policy.model_validate({"defaults": {"tier": "standard", "sla_ms": 10_000},
                                    "tiers": {"standard": {"min_quality": 0.0}},
                                    "backends": {"echo": {"quality": 0.8, "price_per_image_usd": 0.01,
                                                         "latency_prior": {"p50_ms": 100, "p95_ms": 500}}},
                                    "dispatch": {"backoff_initial_ms": 1, "backoff_max_ms": 5}})
    caplog.set_level(logging.DEBUG)
    server = serve(settings, policy)
    seen = []
    for _ in range(6):  # enough to eject it (its error text is then on status pages)
        r = httpx.post(server.base_url + "/v1/images/generations", json={"prompt": "p", "size": "1024x1024"},
                       timeout=30)
        assert r.status_code in (502, 503, 504)
        seen.append(r.text)
    seen.append(httpx.get(server.base_url + "/v1/backends").text)
    seen.append(httpx.get(server.base_url + "/readyz").text)
    seen.append(httpx.get(server.base_url + "/metrics").text)
    server.stop()
    reader = open_reader(settings)
    seen.append(json.dumps(reader.recent(limit=100)))
    seen.append(caplog.text)
    joined = "\n".join(seen)
    assert "upstream failed" in joined  # the upstream's text did arrive, scrubbed
    assert KEY not in joined and KEY[8:24] not in joined
    assert REDACTED in joined


def test_metrics_can_require_an_admin_key(settings, serve, monkeypatch):
    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "admin-key-for-metrics")
    settings.metrics.require_key = True
    server = serve(settings, Policy.model_validate({"backends": {"local": {"quality": 0.6}}}))
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    ok = httpx.get(server.base_url + "/metrics", headers={"authorization": "Bearer admin-key-for-metrics"})
    assert ok.status_code == 200 and "imagegw_requests_total" in ok.text
    time.sleep(0)
