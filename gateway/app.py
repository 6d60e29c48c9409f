"""`create_app(settings, ...)`: the Litestar app, assembled from data, with no globals."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from litestar import Litestar, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig

from backends.protocol import Backend
from policies.schema import Policy

from .api.admin import admin_router
from .api.images import create_image, get_image_file
from .api.jobs import create_job, job_route, webhook_secret
from .api.meta import healthz, list_backends, list_models, readyz
from .audit import AuditLog, open_audit
from .auth import KeyRing
from .errors import GatewayError, error_body
from .image_store import ImageStore
from .jobs import Jobs, build_jobs
from .metrics import Metrics
from .openapi import complete_openapi
from .policy_admin import PolicyRegistry
from .policy_history import PolicyHistory
from .redact import Redactor
from .registry import Backends, build_backends
from .result_cache import ResultCache
from .sandbox_runner import SandboxServer, load_sandbox_config
from .service import GenerationService
from .settings import Settings
from .state import MemoryStore, StateStore
from .state_redis import RedisStore
from .state_sync import StateSync

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _gateway_error(_: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type=MediaType.JSON, headers=exc.headers)


def _http_error(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors in OpenAI's shape, naming the field (a query value that did not parse) or the limit
    (a body over server.max_body_bytes)."""
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message, param = exc.detail, None
    problems = exc.extra if isinstance(exc.extra, list) else []
    if problems and isinstance(problems[0], dict) and problems[0].get("key"):
        param = str(problems[0]["key"])
        message = f"{param}: {problems[0].get('message') or 'invalid value'}"
    elif exc.status_code == 413:
        message = f"request body over the {request.app.request_max_body_size} byte limit (server.max_body_bytes)"
    elif exc.status_code == 404 and exc.detail == "Not Found":  # no route (not a missing file under one)
        message = _not_served(request.method, request.url.path)
    elif exc.status_code == 405:
        allowed = next((v for k, v in (exc.headers or {}).items() if k.lower() == "allow"), None)
        message = f"{request.method} is not allowed on {request.url.path}"
        message += f"; allowed: {allowed}" if allowed else ""
    return Response(error_body(message, type_, param, f"http_{exc.status_code}"),
                    status_code=exc.status_code, media_type=MediaType.JSON, headers=exc.headers)


# OpenAI's image endpoints this gateway does not serve: a client of OpenAI's SDK calling one learns why.
_OPENAI_ONLY = {"/v1/images/edits": "image edits", "/v1/images/variations": "image variations"}


def _not_served(method: str, path: str) -> str:
    what = _OPENAI_ONLY.get(path.rstrip("/"))
    if what is not None:
        return (f"{method} {path}: {what} are not served by this gateway; it generates images from a prompt "
                "(POST /v1/images/generations, or POST /v1/images/jobs for async jobs)")
    return f"{method} {path}: no such path; the API is described at GET /openapi.json"


def _unexpected(_: Request, exc: Exception) -> Response:
    log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
    return Response(error_body("internal error", "server_error", None, "internal_error"),
                    status_code=500, media_type=MediaType.JSON)


def _state_store(settings: Settings, replica_id: str) -> StateStore:
    if not settings.redis_url:
        return MemoryStore()
    import redis.asyncio as redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
    return RedisStore(client, settings.redis_namespace, replica_id=replica_id)


def _replica_identity(data_dir) -> tuple[str, object | None]:
    """(replica id, the data folder's lock if this process owns the folder). The id is kept in the data folder, so a
    restarted replica writes its spend to the same field it wrote before; a second process on the same
    folder gets a fresh id and does not claim the folder's audit log as its own record."""
    import fcntl
    import uuid

    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / ".replica.lock", "a+")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        log.warning("data folder %s is in use by another gateway process: this one gets its own replica id",
                    data_dir)
        return uuid.uuid4().hex, None
    path = data_dir / "replica_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex)
    return path.read_text().strip(), lock


def _seed_spend(store: StateStore, audit: AuditLog, now: float) -> None:
    """This month's and today's spend per tenant from this replica's own audit records (its SQLite file, or its
    rows in the shared Postgres): budgets and shared totals survive a restart (and a Redis that lost everything)."""
    import calendar

    from .state import period_keys

    t = time.gmtime(now)
    day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    month_start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    day, month = period_keys(now)
    totals = {}
    replica = audit.stamp.get("replica") if audit.sink.shared else None  # else the file is this replica's own
    for tenant, (d, m) in audit.reader.spend_since(day_start, month_start, replica=replica).items():
        totals[(tenant, day)], totals[(tenant, month)] = d, m
    if totals:
        store.seed_spend(totals)
        log.info("spend of %d tenants restored from the audit log", len(totals) // 2)


def _redactor(settings: Settings) -> Redactor:
    """Every secret this process was given: provider keys, the admin key, the Redis password."""
    from urllib.parse import urlsplit

    secrets = [key.get_secret_value() for p in settings.backends.values() if (key := p.api_key()) is not None]
    secrets.append(settings.auth.admin_key() or "")
    if settings.redis_url:
        secrets.append(urlsplit(settings.redis_url).password or "")
    if settings.audit.dsn_value():
        secrets += [settings.audit.dsn_value(), _dsn_password(settings.audit.dsn_value())]
    return Redactor(secrets)


def _dsn_password(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return str(conninfo_to_dict(dsn).get("password") or "")
    except Exception:  # not a connection string psycopg can parse: the whole string is redacted above
        return ""


def _policy_payload(entry) -> dict:
    return {"policy": entry.policy.model_dump(mode="json"), "fingerprint": entry.policy.fingerprint,
            "author": entry.author, "note": entry.note, "at": entry.at}


async def _join_replicas(store: StateStore, registry: PolicyRegistry) -> None:
    """Adopt the policy the other replicas run, then follow their changes."""
    if isinstance(store, RedisStore):
        history = await store.policy_history()
        if history:
            registry.restore(history)  # versions and who/when survive restarts and reach new replicas
        elif not store.degraded:
            await store.publish_policy(_policy_payload(registry.version))  # the first replica seeds it

        async def adopt(payload: dict) -> None:
            registry.adopt(payload)

        await store.subscribe_policy(adopt)


@dataclass
class Components:
    """Everything one gateway process holds, built from settings (no globals)."""

    settings: Settings
    built: Backends
    policy: PolicyRegistry
    keyring: KeyRing
    audit: AuditLog
    images: ImageStore
    store: StateStore
    service: GenerationService
    sync: StateSync
    metrics: Metrics
    sandbox: SandboxServer | None
    redactor: Redactor
    data_lock: object | None = None  # held while this process owns the data folder
    jobs: Jobs | None = None
    webhook_client: object | None = None  # httpx.AsyncClient for job webhooks
    fleet: object | None = None  # RemoteFleet: the pool's workers on other hosts (local.workers: remote)

    @property
    def backends(self) -> dict[str, Backend]:
        return self.built.backends


def assemble(settings: Settings, policy: Policy, backends: Mapping[str, Backend] | Backends | None = None
             ) -> Components:
    """Build and wire the parts; nothing starts until the app's lifespan runs."""
    if backends is None:
        backends = build_backends(settings)
    built = backends if isinstance(backends, Backends) else Backends(dict(backends))
    registry = PolicyRegistry(policy, path=settings.config_dir / settings.policy_file if settings.config_dir else None,
                              store=PolicyHistory(settings.resolve("policy_history.sqlite3")))
    keyring, generated_admin_key = KeyRing.from_settings(settings.auth)
    if generated_admin_key:
        # Shown once, like a notebook server's token: only its hash is kept.
        print(f"\n  admin key (generated for this run; set {settings.auth.admin_key_env} to keep one): "
              f"{generated_admin_key}\n", flush=True)
    audit = open_audit(settings)
    images = ImageStore(settings.resolve(settings.images.dir), settings.images.url_ttl_s)
    replica_id, data_lock = _replica_identity(settings.data_dir)
    audit.stamp = {"replica": replica_id}  # a shared audit store tells replicas apart (spend restored at start)
    store = _state_store(settings, replica_id)
    redactor = _redactor(settings)
    if isinstance(store, RedisStore):
        for guard in built.guards.values():
            if guard.pacer.window is not None:
                guard.pacer.shared_take = store.take_token  # one window for every replica
                guard.pacer.local_share = lambda: 1 / store.ledger.replicas  # while Redis is away
    if built.cap is not None:
        built.cap.groups = _tier_groups(registry, built)
    cache = settings.cache
    results = ResultCache(settings.resolve(cache.dir), max_bytes=cache.max_bytes, ttl_s=cache.ttl_s,
                          unseeded=cache.unseeded, shared_across_tenants=cache.shared_across_tenants,
                          single_flight=cache.single_flight, enabled=cache.enabled, shared_dir=cache.shared_dir,
                          fleet=store)
    service = GenerationService(backends=built.backends, policy=registry, audit=audit, images=images,
                                limits=settings.limits, public_url=settings.server.public_url,
                                guards=built.guards, store=store, redact=redactor, results=results)
    sync = StateSync(store, service.snapshots.stats, built.guards, settings.state_sync_interval_s)
    registry.on_apply = lambda entry: sync.spawn(store.publish_policy(_policy_payload(entry)))
    results.spawn = sync.spawn  # a fleet lease is released off the request path
    local = built.backends.get("local")
    metrics = Metrics(built.guards, lambda: local.load().pool if local is not None else None,
                      lambda: audit.backlog, lambda: store.degraded, lambda: _budget_use(registry, sync))
    service.observers += [sync.observe_record, metrics.observe]
    sandbox = (SandboxServer(built.sandbox_url, load_sandbox_config(settings.sandbox.config_file))
               if built.sandbox_url else None)
    import httpx

    webhook_client = httpx.AsyncClient(follow_redirects=False, trust_env=False) if settings.jobs.enabled else None
    jobs = build_jobs(settings, service, f"{replica_id}:{os.getpid()}", webhook_client)
    if jobs is not None:
        redactor.add([jobs.master_secret.decode()])
    return Components(settings, built, registry, keyring, audit, images, store, service, sync, metrics, sandbox,
                      redactor, data_lock, jobs, webhook_client, _remote_fleet(settings, built, replica_id))


def _remote_fleet(settings: Settings, built: Backends, replica_id: str):
    if not (settings.local.enabled and settings.local.workers == "remote" and "local" in built.backends):
        return None
    import redis.asyncio as redis

    from backends.local.stream import FleetKeys, RemoteFleet

    pool = built.backends["local"]
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
    fleet = RemoteFleet(client, FleetKeys(settings.redis_namespace), pool, gateway_id=f"{replica_id}-{os.getpid()}",
                        max_batch_s=settings.local.remote_max_batch_s)
    pool.external_batches = lambda: fleet.lag
    return fleet


def _tier_groups(registry: PolicyRegistry, built: Backends):
    """Each tier's candidates under the current policy (enabled, configured, good enough): the sets the
    ejection cap keeps a share of in service. Recomputed only when the policy changes."""
    cache: dict[str, tuple[frozenset[str], ...]] = {}

    def groups() -> tuple[frozenset[str], ...]:
        policy = registry.current
        if policy.fingerprint not in cache:
            cache.clear()
            cache[policy.fingerprint] = tuple(
                frozenset(n for n, bp in policy.backends.items()
                          if bp.enabled and n in built.backends and bp.quality >= tier.min_quality)
                for tier in policy.tiers.values())
        return cache[policy.fingerprint]

    return groups


def _budget_use(registry: PolicyRegistry, sync: StateSync) -> list[tuple[str, str, float, float | None]]:
    budgets, rows = registry.current.budgets, []
    for tenant, used in sync.spend.items():
        limit = budgets.for_tenant(tenant)
        rows.append((tenant, "day", used["day"], limit.daily_usd if limit else None))
        rows.append((tenant, "month", used["month"], limit.monthly_usd if limit else None))
    return rows


def _lifespan(c: Components):
    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await c.audit.start()
        if c.data_lock is not None:
            _seed_spend(c.store, c.audit, time.time())
        await c.images.start()
        if c.settings.policy_reload_interval_s > 0:
            await c.policy.watch(c.settings.policy_reload_interval_s)
        await _join_replicas(c.store, c.policy)
        await c.sync.start()
        if c.sandbox is not None:
            await c.sandbox.start()
        for backend in c.backends.values():
            await backend.start()
        if c.fleet is not None:
            await c.fleet.start()  # remote workers join the pool as their heartbeats arrive
        # What start-up built lives as long as the process: out of the collector's sight, so the full
        # collections that run under load do not walk it (they were the latency tail at high load).
        if c.jobs is not None:
            await c.jobs.runner.start()  # queued jobs (a restart's included) start running
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:  # jobs go back to the queue, backends drain, so their last requests are still audited
            if c.jobs is not None:
                await c.jobs.runner.close()
                c.jobs.store.close()
                await c.webhook_client.aclose()
            for backend in c.backends.values():
                with contextlib.suppress(Exception):
                    await backend.aclose()
            if c.fleet is not None:
                await c.fleet.close()
            for closer in (c.images.close, c.policy.close, c.sync.close, c.store.close):
                await closer()
            if c.sandbox is not None:
                await c.sandbox.stop()
            await c.audit.close()
            if c.data_lock is not None:
                c.data_lock.close()  # the folder is free for the next process
            log.info("shut down; audit records written: %d", c.audit.written)

    return lifespan


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request, settings: Settings, policy: PolicyRegistry,
                 backends: Mapping[str, Backend]) -> dict:
    # Litestar's schema, completed with what it cannot infer (gateway/openapi.py): the generation body the
    # handler parses itself, OpenAI's error body, every status, the limits in force now.
    models = ["auto", *settings.limits.model_aliases]
    for name, backend in backends.items():
        models += [name, *(f"{name}/{m}" for m in backend.offer.models), *backend.offer.models]
    return complete_openapi(request.app.openapi_schema.to_schema(), settings, policy.current.tiers, set(models))


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics_endpoint(request: Request, metrics: Metrics, settings: Settings) -> Response:
    if settings.metrics.require_key:  # the series name tenants and their spend
        request.app.state.keyring.admin(request.headers.get("authorization"))
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")  # Litestar adds the charset


def _openapi_config() -> OpenAPIConfig:
    """/schema renders Swagger UI from assets served here (the swagger-ui-bundle package), so the docs page
    works offline; Litestar's default pages load their scripts from a CDN."""
    from litestar.openapi.plugins import SwaggerRenderPlugin

    assets = "/schema-assets"
    return OpenAPIConfig(title="imagegw", version="0.1.0", path="/schema", render_plugins=[SwaggerRenderPlugin(
        js_url=f"{assets}/swagger-ui-bundle.js", css_url=f"{assets}/swagger-ui.css",
        standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js", path="/",
        favicon=f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png'>")])


def _schema_assets():
    import swagger_ui_bundle
    from litestar.static_files import create_static_files_router

    return create_static_files_router(path="/schema-assets", directories=[swagger_ui_bundle.swagger_ui_path],
                                      include_in_schema=False)


def _console():
    """The ops console: plain files of this package (no CDN, no build step), signed in with an admin key."""
    from pathlib import Path

    from litestar.static_files import create_static_files_router

    return create_static_files_router(path="/ui", directories=[Path(__file__).parent / "ui"], html_mode=True,
                                      include_in_schema=False)


def _const(value) -> Provide:
    return Provide(lambda: value, sync_to_thread=False)


def create_app(settings: Settings, policy: Policy,
               backends: Mapping[str, Backend] | Backends | None = None) -> Litestar:
    """Everything the gateway serves; resources open and close in the lifespan."""
    c = assemble(settings, policy, backends)
    return Litestar(
        route_handlers=[create_image, create_job, job_route, webhook_secret, get_image_file, list_models,
                        list_backends, healthz, readyz, openapi_json, metrics_endpoint, admin_router,
                        _schema_assets(), _console()],
        dependencies={name: _const(value) for name, value in {
            "service": c.service, "image_store": c.images, "backends": c.backends, "policy": c.policy,
            "audit": c.audit, "snapshots": c.service.snapshots, "guards": c.built.guards, "store": c.store,
            "settings": settings, "metrics": c.metrics}.items()},
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=[_lifespan(c)],
        state=State({"keyring": c.keyring, "redactor": c.redactor, "jobs": c.jobs}),
        openapi_config=_openapi_config(),
        request_max_body_size=settings.server.max_body_bytes,
        debug=False,
        logging_config=None,  # the CLI configures logging once; the app must not touch root handlers
    )
