"""Async jobs: `POST /v1/images/jobs` stores the request and answers 202 at once; a runner on any replica runs it
through the same path as a synchronous request; the result is polled (`GET`) or pushed (a signed webhook).
Also the store behind `Idempotency-Key` on both POST routes."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .runner import JobRunner
from .store import JobStore, open_job_store
from .webhooks import UrlPolicy, WebhookSender, tenant_secret

__all__ = ["Jobs", "build_jobs"]

log = logging.getLogger(__name__)


@dataclass
class Jobs:
    store: JobStore
    runner: JobRunner
    url_policy: UrlPolicy
    master_secret: bytes

    def secret_for(self, tenant: str) -> str:
        return tenant_secret(self.master_secret, tenant)


def _master_secret(settings) -> bytes:
    value = os.environ.get(settings.jobs.webhook_secret_env or "", "")
    if value:
        return value.encode()
    path = Path(settings.resolve("webhook_secret"))
    if not path.exists():  # one replica, embedded: generated once and kept (a fleet sets the variable)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        log.info("webhook master secret generated into %s (set %s on every replica of a fleet)", path,
                 settings.jobs.webhook_secret_env)
    return path.read_text().strip().encode()


def build_jobs(settings, service, owner: str, client) -> Jobs | None:
    j = settings.jobs
    if not j.enabled:
        return None
    store = open_job_store(settings)
    policy = UrlPolicy(allow_http=j.webhook_allow_http, allow_private=j.webhook_allow_private,
                       hosts=tuple(j.webhook_hosts))
    master = _master_secret(settings)
    sender = WebhookSender(store, client, master, policy, max_age_s=j.webhook_retry_for_s,
                           timeout_s=j.webhook_timeout_s)
    runner = JobRunner(store, service, owner, concurrency=j.concurrency, poll_interval_s=j.poll_interval_s,
                       webhooks=sender, base_url=settings.server.public_url or "")
    return Jobs(store, runner, policy, master)
