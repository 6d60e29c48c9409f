"""Async jobs (`/v1/images/jobs`) and `Idempotency-Key` on both POST routes."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time

import msgspec
from litestar import HttpMethod, Request, get, post, route
from litestar.response import Response

from ..auth import admin_only
from ..errors import Conflict, GatewayError, InvalidRequest, NotFound
from ..jobs import Jobs
from ..service import GenerationService, RequestContext, time_ordered_id

__all__ = ["create_job", "idempotent", "job_route", "webhook_secret"]

class KeyReused(InvalidRequest):
    """The IETF idempotency-key draft's answer to a key reused with another payload: 422."""

    status = 422

    def __init__(self):
        super().__init__("Idempotency-Key: already used with another request body", param="Idempotency-Key",
                         code="idempotency_key_reused")


_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces: what clients send (UUIDs, hashes)
_PENDING_FOR_S = 3600.0  # a key held by a request that never finished (its replica died) is free after this


def _tenant(request: Request, service: GenerationService, ctx: RequestContext) -> str:
    try:
        return request.app.state.keyring.app(request.headers.get("authorization")).tenant
    except GatewayError as exc:
        service.record_rejection(ctx, exc)
        raise


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.match(key):
        raise InvalidRequest("Idempotency-Key: 1-255 printable ASCII characters, no spaces", param="Idempotency-Key")
    return key


def fingerprint(route: str, payload) -> str:
    return hashlib.sha256(route.encode() + b"\n" + msgspec.json.encode(payload, order="sorted")).hexdigest()


def _decode_object(body: bytes) -> dict:
    try:
        payload = msgspec.json.decode(body)
    except msgspec.DecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return payload


async def idempotent(jobs: Jobs, tenant: str, key: str, body: bytes, run, refused=lambda exc: None,
                     replayed=lambda original_id: None):
    """Run the synchronous route once per (tenant, key): a retry with the same body gets the first answer
    (never a second charge); another body with the key is a 422 (the IETF idempotency-key draft); the key in use
    by a request still running, a 409.
    Only answers are remembered: a failed request charged nothing, so a retry runs again."""
    try:
        print_ = fingerprint("generations", _decode_object(body))
    except InvalidRequest:
        print_ = hashlib.sha256(body).hexdigest()
    state, found = await jobs.store.remember(tenant, key, print_, time.time(), _PENDING_FOR_S)
    if state == "mismatch":
        exc = KeyReused()
        refused(exc)  # audited like any refused request
        raise exc
    if state == "busy":
        exc = Conflict("Idempotency-Key: a request with this key is still running; retry shortly",
                       param="Idempotency-Key", code="idempotency_key_in_use", headers={"retry-after": "1"})
        refused(exc)
        raise exc
    if state == "replay":
        status, headers, stored = found
        replayed(headers.get("x-gateway-decision-id"))  # audited: a record of its own, pointing at the first
        return status, {**headers, "idempotent-replayed": "true"}, stored
    try:
        status, headers, answer = await run()
    except BaseException:
        await asyncio.shield(jobs.store.forget(tenant, key))
        raise
    await jobs.store.answered(tenant, key, status, headers, answer)
    return status, headers, answer


def _public(job: dict) -> dict:
    out = {"id": job["id"], "object": "image.job", "status": job["status"], "created_at": job["created_at"],
           "updated_at": job["updated_at"], "finished_at": job["finished_at"], "backend": job["backend"],
           "cost_usd": job["cost_usd"], "decision_id": job["decision_id"]}
    if job["status"] == "succeeded":
        out["data"] = job["data"]
    if job["error"] is not None:
        out["error"] = job["error"]["error"] if "error" in job["error"] else job["error"]
    if job.get("held_until"):
        out["held_until"] = job["held_until"]  # waiting for idle pool capacity (policy `jobs`)
    if job["webhook_url"]:
        out["webhook"] = {"url": job["webhook_url"], "state": job["webhook_state"]}
    return out


def _jobs(request: Request) -> Jobs:
    jobs = request.app.state.jobs
    if jobs is None:
        raise NotFound("async jobs are turned off on this gateway (jobs.enabled)", param="jobs")
    return jobs


@post("/v1/images/jobs", status_code=202, summary="Create images asynchronously: answers at once with a job",
      response_description="The job (queued); poll its Location or receive a signed webhook")
async def create_job(request: Request, service: GenerationService) -> Response:
    ctx = RequestContext(base_url_of=lambda: str(request.base_url))
    tenant = ctx.tenant = _tenant(request, service, ctx)
    jobs = _jobs(request)
    try:
        key = idempotency_key(request)
        payload = _decode_object(await request.body())
        webhook_url = payload.pop("webhook_url", None)
        if webhook_url is not None:
            if not isinstance(webhook_url, str) or len(webhook_url) > 2048:
                raise InvalidRequest("webhook_url: a URL string of at most 2048 characters", param="webhook_url")
            why = await asyncio.to_thread(jobs.url_policy.check, webhook_url)
            if why:
                raise InvalidRequest(f"webhook_url: {why}", param="webhook_url", code="webhook_url_not_allowed")
        body = msgspec.json.encode(payload)
        service.check(body, ctx)  # a bad field or a limit is a 400 now, not a failed job later
    except GatewayError as exc:
        service.record_rejection(ctx, exc)
        raise
    try:
        job, created = await jobs.store.add(time_ordered_id(), tenant, body, webhook_url, key,
                                            fingerprint("jobs", [payload, webhook_url]) if key else None, time.time())
    except ValueError:
        raise KeyReused() from None
    if created:
        jobs.runner.poke()
    headers = {"location": f"/v1/images/jobs/{job['id']}"} | ({} if created else {"idempotent-replayed": "true"})
    return Response(_public(job), status_code=202, headers=headers)


@route("/v1/images/jobs/{job_id:str}", http_method=[HttpMethod.GET, HttpMethod.DELETE], status_code=200,
       summary="A job (GET: its status, and the images once it succeeded; DELETE: cancel it if queued or running)")
async def job_route(request: Request, job_id: str, service: GenerationService) -> dict:
    """One handler for both methods, so the path's Allow header lists both. A cancelled job stays readable
    (status cancelled): DELETE cancels, it does not erase."""
    tenant = _tenant(request, service, RequestContext())
    store = _jobs(request).store
    if request.method == HttpMethod.GET:
        job = await store.get(job_id, tenant)
    else:
        job = await store.cancel(job_id, tenant, time.time())
    if job is None:
        raise NotFound("no job with that id for this API key", param="job_id")
    if request.method == HttpMethod.DELETE and job["status"] != "cancelled":
        raise Conflict(f"job already {job['status']}: nothing to cancel", param="job_id", code="job_finished")
    return _public(job)


@get("/admin/webhook-secret", guards=[admin_only], summary="A tenant's webhook signing secret (to hand to it)")
async def webhook_secret(request: Request, tenant: str) -> dict:
    return {"tenant": tenant, "secret": _jobs(request).secret_for(tenant),
            "scheme": "Standard Webhooks: webhook-signature v1,<base64 HMAC-SHA256 of id.timestamp.body>"}
