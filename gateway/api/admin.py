"""Ops routes (admin keys only): policy get/validate/replace/history/diff/rollback, audit query and export, stats."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping

import msgspec
from litestar import HttpMethod, Request, Router, get, post, route
from litestar.response import Stream

from backends.protocol import Backend
from policies.lint import policy_warnings

from ..audit import AuditLog, audit_query, audit_stats
from ..auth import admin_only
from ..config import ConfigError, parse_policy
from ..errors import InvalidRequest, NotFound
from ..policy_admin import PolicyRegistry
from ..service import GenerationService
from ..settings import Settings
from ..state import StateStore

__all__ = ["admin_router"]


class PolicyRejected(InvalidRequest):
    status = 422
    code = "policy_invalid"


def _refusals(candidate, backends: Mapping[str, Backend]) -> list[str]:
    """What makes a valid policy unsafe to apply: a tier no configured backend can serve (every request of
    it would get 503) is refused, with its path."""
    return [w for w in policy_warnings(candidate, set(backends)) if w.startswith("tiers.")]


async def _policy_body(request: Request, backends: Mapping[str, Backend]):
    body = await request.body()
    text = body.decode("utf-8", "replace")
    try:
        candidate = parse_policy(text, "request body")
        if not text.strip() or not _non_empty(text):
            raise ConfigError("request body", ["(root): the policy is empty; send a whole policy (GET /admin/policy "
                                               "shows the running one)"])
    except ConfigError as exc:
        raise PolicyRejected("the policy is invalid; the running policy stays",
                             extra={"errors": exc.errors}) from exc
    refusals = _refusals(candidate, backends)
    if refusals:
        raise PolicyRejected("the policy would leave a tier with no backend; the running policy stays",
                             extra={"errors": refusals})
    return candidate


_UNPARSED = object()


def _loaded(text: str):
    """The body as YAML (JSON is YAML), or _UNPARSED when it does not parse (parse_policy says why)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return _UNPARSED


def _non_empty(text: str) -> bool:
    loaded = _loaded(text)  # called once parse_policy has parsed it
    return loaded is not _UNPARSED and bool(loaded)


def _who(request: Request) -> str:
    principal = request.scope.get("principal")
    return principal.tenant if principal else "?"


def _current(policy: PolicyRegistry) -> dict:
    v = policy.version
    return {**v.summary(), "policy": v.policy.model_dump(mode="json"), "yaml": v.yaml(),
            "file_reload_error": policy.last_reload_error}


@post("/policy/validate", status_code=200)
async def validate_policy(request: Request, backends: Mapping[str, Backend]) -> dict:
    body = await request.body()
    if not body.strip():
        raise InvalidRequest("request body is empty; send the policy (YAML or JSON) to validate", param="body")
    if not isinstance(_loaded(body.decode("utf-8", "replace")), dict):  # not even the shape of a policy
        raise InvalidRequest("request body: a policy is a mapping (a JSON object, or YAML)", param="body")
    try:
        candidate = parse_policy(body.decode("utf-8", "replace"), "request body")
    except ConfigError as exc:
        return {"valid": False, "errors": exc.errors, "warnings": []}
    refusals = _refusals(candidate, backends)
    if refusals:
        return {"valid": False, "errors": refusals, "warnings": []}
    return {"valid": True, "errors": [], "fingerprint": candidate.fingerprint,
            "warnings": policy_warnings(candidate, set(backends))}


@route("/policy", http_method=[HttpMethod.GET, HttpMethod.PUT], status_code=200)
async def policy_route(request: Request, policy: PolicyRegistry, backends: Mapping[str, Backend]) -> dict:
    """GET: the running policy. PUT (YAML or JSON): a new version, validated first. One handler for both, so
    the path's Allow header lists both."""
    if request.method == HttpMethod.GET:
        return _current(policy)
    candidate = await _policy_body(request, backends)
    entry = policy.apply(candidate, _who(request), request.query_params.get("note", ""))
    return {**entry.summary(), "warnings": policy_warnings(candidate, set(backends))}


def _trace_spec(body) -> dict:
    """The body's "trace" (a missing or null one: ten minutes of the diurnal synthetic trace)."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    spec = body.get("trace")
    return {"synthetic": "diurnal", "duration_s": 600} if spec is None else spec


@post("/policy/simulate", status_code=200)
async def simulate_policy(request: Request, policy: PolicyRegistry, settings: Settings) -> dict:
    """Body: {"policy": candidate (object or YAML text; default: current), "trace": {...}, "gpus", "seed"}."""
    from ..simulation import build_world, compare, load_trace

    try:
        body = msgspec.json.decode(await request.body())
        candidate = policy.current if body.get("policy") is None else parse_policy(body["policy"], "policy")
        trace = await asyncio.to_thread(load_trace, _trace_spec(body), settings, policy=candidate,
                                        files_under=settings.data_dir)
    except ConfigError as exc:
        raise PolicyRejected("the candidate policy is invalid", extra={"errors": exc.errors}) from exc
    except (msgspec.DecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"bad simulation request: {exc}", param="trace") from exc
    if len(trace) > 200_000:
        raise InvalidRequest("trace: at most 200000 requests", param="trace")
    world = build_world(settings, policy.current, body.get("gpus"))
    current, cand = await asyncio.to_thread(compare, policy.current, candidate, trace, world, int(body.get("seed", 0)))
    return {"requests": len(trace), "current": current.summary(), "candidate": cand.summary()}


@post("/plan", status_code=200)
async def plan_pool(request: Request, policy: PolicyRegistry, settings: Settings) -> dict:
    """Self-host or buy (what `imagegw plan` prints). Body: {"trace": {...} as for /policy/simulate, "max_gpus"
    (0-16, default 4), "gpu_prices": {"h100": 2.0, ...} (default: local.gpu_prices), "min_sla" (0.99), "seed"}."""
    from ..planning import run_plan
    from ..simulation import load_trace

    try:
        body = msgspec.json.decode(await request.body())
        trace = await asyncio.to_thread(load_trace, _trace_spec(body), settings, policy=policy.current,
                                        files_under=settings.data_dir)
    except (msgspec.DecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequest(f"bad plan request: {exc}", param="trace") from exc
    if not trace:
        raise InvalidRequest("trace: it is empty", param="trace")
    if len(trace) > 50_000:
        raise InvalidRequest("trace: at most 50000 requests (the planner replays it ~30 times)", param="trace")
    params = {}
    for name, kind in (("max_gpus", int), ("min_sla", float), ("seed", int)):
        if body.get(name) is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise InvalidRequest(f"{name}: a number", param=name)
            params[name] = kind(value)
    prices = body.get("gpu_prices")
    if prices is not None and (not isinstance(prices, dict) or not prices or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for k, v in prices.items())):
        raise InvalidRequest("gpu_prices: an object of name -> USD per GPU-hour (>= 0)", param="gpu_prices")
    if not 0 < params.get("min_sla", 0.99) <= 1:
        raise InvalidRequest("min_sla: a share, more than 0 and at most 1", param="min_sla")
    try:
        plans = await asyncio.to_thread(run_plan, settings, policy.current, trace, gpu_prices=prices, **params)
    except ValueError as exc:
        param = "max_gpus" if "max_gpus" in str(exc) else "gpu_prices" if "gpu_prices" in str(exc) else "trace"
        raise InvalidRequest(str(exc), param=param) from exc
    return {"requests": len(trace), "plans": [p.to_json() for p in plans]}


@get("/policy/schema")
async def policy_schema() -> dict:
    """The policy's JSON Schema (what `imagegw policy schema` prints): editors and the console check with it."""
    from policies.schema import Policy

    return Policy.model_json_schema()


@get("/policy/history")
async def policy_history(policy: PolicyRegistry) -> dict:
    return {"current": policy.version.version, "versions": [v.summary() for v in reversed(policy.history)]}


@get("/policy/diff")
async def policy_diff(policy: PolicyRegistry, from_: int = 0, to: int = 0) -> dict:
    # ?from_=1&to=2 (defaults: previous against current)
    to = to or policy.version.version
    from_ = from_ or max(1, to - 1)
    diff = policy.diff(from_, to)
    if diff is None:
        missing = "from_" if policy.get(from_) is None else "to"
        raise NotFound(f"{missing}: no such version (have 1..{policy.version.version})", param=missing)
    return {"from": from_, "to": to, "diff": diff}


@post("/policy/rollback/{version:int}", status_code=200)
async def rollback_policy(request: Request, policy: PolicyRegistry, version: int) -> dict:
    entry = policy.rollback(version, _who(request))
    if entry is None:
        raise NotFound(f"no policy version {version}", param="version")
    return entry.summary()


@get("/audit")
async def query_audit(audit: AuditLog, limit: int = 100, cursor: str | None = None, since: float | None = None,
                      until: float | None = None, tenant: str | None = None, backend: str | None = None,
                      outcome: str | None = None, sla_missed: bool | None = None,
                      policy_version: int | None = None) -> dict:
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: 1..1000", param="limit")
    if cursor is not None and not _CURSOR.match(cursor):
        raise InvalidRequest("cursor: not a cursor this API gave (use next_cursor from the previous page)",
                             param="cursor")
    page, next_cursor = await asyncio.to_thread(
        audit_query, audit.reader, limit=limit, cursor=cursor, since=since, until=until, tenant=tenant,
        backend=backend, outcome=outcome, sla_missed=sla_missed, policy_version=policy_version)
    return {"data": page, "next_cursor": next_cursor}


_CURSOR = re.compile(r"^\d+(\.\d+)?(e[+-]?\d+)?~[0-9a-f]{1,64}$")


@get("/audit/export")
async def export_audit(audit: AuditLog, since: float | None = None, until: float | None = None) -> Stream:
    reader = audit.reader

    async def lines() -> AsyncIterator[bytes]:
        cursor = None
        while True:
            page, cursor = await asyncio.to_thread(audit_query, reader, limit=500, cursor=cursor, since=since,
                                                   until=until)
            for record in page:
                yield msgspec.json.encode(record) + b"\n"
            if cursor is None:
                return

    return Stream(lines(), media_type="application/x-ndjson")


@get("/audit/{decision_id:str}")
async def get_audit(audit: AuditLog, decision_id: str) -> dict:
    record = await asyncio.to_thread(audit.reader.get, decision_id)
    if record is None:
        raise NotFound("no audit record with that id (records are written within a second)", param="decision_id")
    return record


@get("/spend")
async def spend(store: StateStore, policy: PolicyRegistry) -> dict:
    budgets = policy.current.budgets
    out = []
    for tenant, used in sorted((await store.spend(time.time())).items()):
        limit = budgets.for_tenant(tenant)
        out.append({"tenant": tenant, "day_usd": used["day"], "month_usd": used["month"],
                    "daily_limit_usd": limit.daily_usd if limit else None,
                    "monthly_limit_usd": limit.monthly_usd if limit else None})
    return {"data": out, "shared": store.shared}


@get("/stats")
async def stats(audit: AuditLog, service: GenerationService, policy: PolicyRegistry,
                window_s: float = 3600.0) -> dict:
    if not 0 < window_s <= 31_622_400:
        raise InvalidRequest("window_s: seconds, more than 0 and at most a year (31622400)", param="window_s")
    rows = await asyncio.to_thread(audit_stats, audit.reader, time.time() - window_s,
                                   policy.current.cost_drift_warn)
    cache = service.results.stats() if service.results is not None else None  # this replica, since it started
    return {"window_s": window_s, "backends": rows, "result_cache": cache}


admin_router = Router(path="/admin", guards=[admin_only], include_in_schema=True, route_handlers=[
    policy_route, validate_policy, simulate_policy, plan_pool, policy_schema, policy_history, policy_diff,
    rollback_policy, query_audit, export_audit, get_audit, stats, spend,
])
