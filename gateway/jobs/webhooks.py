"""Webhooks for finished jobs, by the Standard Webhooks convention (standardwebhooks.com):

    webhook-id: <job id>            the same on every retry: receivers de-duplicate by it
    webhook-timestamp: <unix seconds>
    webhook-signature: v1,<base64 HMAC-SHA256 over "<id>.<timestamp>.<body>" with the tenant's secret>

A tenant's secret is `whsec_` + base64 of 32 bytes derived from the gateway's master secret
(`jobs.webhook_secret_env`) and the tenant's name, so replicas agree without sharing a table; ops hand it to
the tenant (`GET /admin/webhook-secret?tenant=`). Delivery is at least once until acknowledged (a 2xx), with
exponential backoff for a bounded time, and never again once acknowledged. Only URLs the policy allows are
called: https (http only where configured), public addresses (private, loopback and link-local refused unless
allowed), the allowed hosts when a list is given; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

__all__ = ["UrlPolicy", "WebhookSender", "sign", "tenant_secret", "verify"]

log = logging.getLogger(__name__)


def tenant_secret(master: bytes, tenant: str) -> str:
    key = hmac.new(master, b"imagegw-webhook:" + tenant.encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(key).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300, now: float | None = None):
    """What a receiver does (tests, and a reference for tenants): raises ValueError when not authentic."""
    msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    if abs((now or time.time()) - ts) > tolerance_s:
        raise ValueError("timestamp outside the tolerance")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    for candidate in headers["webhook-signature"].split():
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return
    raise ValueError("no matching signature")


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allow_http: bool = False
    allow_private: bool = False
    hosts: tuple[str, ...] = ()  # empty: any host that resolves to allowed addresses

    def check(self, url: str) -> str | None:
        """None when allowed, else why not (in words for the 400 and the log)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return "not a URL"
        if parts.scheme not in (("https", "http") if self.allow_http else ("https",)):
            return "the scheme must be https" + (" or http" if self.allow_http else "")
        host = parts.hostname
        if not host or parts.username or parts.password:
            return "a host is needed, and no user:password@ in the URL"
        if self.hosts and not any(host == h or host.endswith("." + h) for h in self.hosts):
            return f"host {host!r} is not in jobs.webhook_hosts"
        if self.allow_private:
            return None
        try:
            infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
        except OSError:
            return f"host {host!r} does not resolve"
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                return f"host {host!r} resolves to a private, loopback or reserved address ({address})"
        return None


class WebhookSender:
    """Sends the due webhooks of the job store (a loop per replica; the store hands each to one replica)."""

    def __init__(self, store, client, master_secret: bytes, policy: UrlPolicy, *, max_age_s: float,
                 timeout_s: float = 10.0, base_backoff_s: float = 2.0, max_backoff_s: float = 600.0):
        self._store, self._client, self._master, self._policy = store, client, master_secret, policy
        self._max_age_s, self._timeout_s = max_age_s, timeout_s
        self._base, self._cap = base_backoff_s, max_backoff_s
        self.sent = 0

    async def send_due(self, now: float) -> int:
        due = await self._store.due_webhooks(now, hold_s=self._timeout_s * 3)
        for job in due:
            await self._send(job, now)
        return len(due)

    async def _send(self, job: dict, now: float) -> None:
        attempts = job.pop("webhook_attempts") + 1
        event = {"type": f"image.job.{job['status']}", "timestamp": job["finished_at"],
                 "data": {k: v for k, v in job.items() if k not in ("tenant", "webhook_state")}}
        body = msgspec.json.encode(event)
        ts = int(time.time())
        secret = tenant_secret(self._master, job["tenant"])
        headers = {"content-type": "application/json", "webhook-id": job["id"], "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, job["id"], ts, body), "user-agent": "imagegw-webhooks"}
        error = await asyncio.to_thread(self._policy.check, job["webhook_url"])  # resolves: off the loop
        if error is None:
            try:
                response = await self._client.post(job["webhook_url"], content=body, headers=headers,
                                                    timeout=self._timeout_s, follow_redirects=False)
                if 200 <= response.status_code < 300:
                    await self._store.webhook_done(job["id"], "delivered", attempts, None, None)
                    self.sent += 1
                    return
                error = f"HTTP {response.status_code}"
            except Exception as exc:  # refused, reset, timed out: try again later
                error = type(exc).__name__
        if now - (job["finished_at"] or now) > self._max_age_s:
            log.warning("webhook for job %s abandoned after %d attempts (%s)", job["id"], attempts, error)
            await self._store.webhook_done(job["id"], "abandoned", attempts, None, error)
            return
        backoff = min(self._cap, self._base * 2 ** (attempts - 1)) * random.uniform(0.8, 1.2)
        await self._store.webhook_done(job["id"], "pending", attempts, now + backoff, error)
