"""The OpenAPI document as the server really answers: OpenAI's error body, every status each route gives,
the x-gateway-* headers, the limits in force (from settings and the running policy), real content types.

Litestar derives a document from the handlers; the generation handler parses its own body (to answer in
OpenAI's shape), and errors go through one exception handler, so what Litestar infers is completed here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from .schemas import GenerationRequest
from .settings import Settings

__all__ = ["complete_openapi"]

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
        "additionalProperties": True,  # attempts, rejected backends, policy errors
    }},
}
_REF = {"$ref": "#/components/schemas/Error"}
_JSON_ERROR = {"application/json": {"schema": _REF}}

_WHY = {
    400: "Bad input: `param` names the field", 401: "Missing or unknown API key", 403: "An app key on an admin route",
    404: "Not found", 405: "Method not allowed", 409: "Conflict: the job already finished, or the "
    "Idempotency-Key is in use by a request still running (Retry-After)", 413: "Body over server.max_body_bytes",
    422: "The policy is invalid or unsafe to apply (every error's path in `errors`); on the image routes, an "
         "Idempotency-Key already used with another body",
    429: "The tenant is over its budget (x-should-retry: false; Retry-After: until it resets)",
    500: "Internal error (a bug; never from client input)",
    502: "Every candidate backend failed (`attempts`)",
    503: "No backend can serve: `rejected` says why; x-should-retry: false when retrying cannot help, "
         "Retry-After when it can",
    504: "The SLA passed before any backend delivered (`attempts`)",
}
_RETRY_HEADERS = {
    "retry-after": {"description": "Seconds until a retry may succeed", "schema": {"type": "string"}},
    "x-should-retry": {"description": "false: retrying cannot help (OpenAI SDKs obey it)",
                       "schema": {"type": "string", "enum": ["false"]}},
}
_GATEWAY_HEADERS = {
    "x-gateway-backend": {"description": "The backend that made the images", "schema": {"type": "string"}},
    "x-gateway-cost-usd": {"description": "What the request cost, USD", "schema": {"type": "string"}},
    "x-gateway-decision-id": {"description": "The audit record's id", "schema": {"type": "string"}},
    "x-gateway-policy-version": {"description": "The policy that routed it", "schema": {"type": "string"}},
    "x-gateway-sandbox": {"description": "true: placeholder images from the emulators", "schema": {"type": "string"}},
}
_IMAGES = {
    "type": "object", "required": ["created", "data"],
    "properties": {
        "created": {"type": "integer"}, "size": {"type": "string"}, "output_format": {"type": "string"},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "b64_json": {"type": "string"}, "url": {"type": "string"}}}},
    },
}
_ADMIN = {401, 403}
# Statuses each route answers besides 200 (and 405 for other methods), by (method, path).
_STATUSES: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/images/generations"): {400, 401, 409, 413, 422, 429, 502, 503, 504},
    ("post", "/v1/images/jobs"): {400, 401, 404, 413, 422},
    ("get", "/v1/images/jobs/{job_id}"): {401, 404},
    ("delete", "/v1/images/jobs/{job_id}"): {401, 404, 409},
    ("get", "/admin/webhook-secret"): _ADMIN | {400, 404},
    ("get", "/v1/images/files/{name}"): {404},
    ("get", "/readyz"): {503},
    ("put", "/admin/policy"): _ADMIN | {413, 422},
    ("post", "/admin/policy/validate"): _ADMIN | {400, 413},
    ("post", "/admin/policy/simulate"): _ADMIN | {400, 413, 422},
    ("post", "/admin/plan"): _ADMIN | {400, 413},
    ("get", "/admin/policy/diff"): _ADMIN | {400, 404},
    ("post", "/admin/policy/rollback/{version}"): _ADMIN | {400, 404},
    ("get", "/admin/audit"): _ADMIN | {400},
    ("get", "/admin/audit/export"): _ADMIN | {400},
    ("get", "/admin/audit/{decision_id}"): _ADMIN | {404},
    ("get", "/admin/stats"): _ADMIN | {400},
}
# YAML is accepted too (JSON is YAML); documented as the JSON object it must be, since any string is a
# "valid" YAML body and most are no policy.
_POLICY_BODY = {"required": True, "description": "A whole policy: a JSON object (or the same as YAML)",
                "content": {"application/json": {"schema": {"type": "object"}}}}


def _statuses(method: str, path: str) -> set[int]:
    known = _STATUSES.get((method, path))
    if known is not None:
        return known
    return _ADMIN if path.startswith("/admin") else set()


def _generation_schema(settings: Settings, tiers: Iterable[str], models: Iterable[str]) -> dict:
    """The request body's schema with the limits the server enforces now."""
    schema = copy.deepcopy(GenerationRequest.model_json_schema())
    props, limits = schema["properties"], settings.limits

    def field(name: str) -> dict:  # an Optional field's non-null branch, or the field itself
        spec = props[name]
        return next((s for s in spec.get("anyOf", []) if s.get("type") != "null"), spec)

    field("prompt")["maxLength"] = limits.prompt_max_chars
    field("n")["maximum"] = limits.max_n
    field("steps")["maximum"] = limits.max_steps
    field("tier")["enum"] = sorted(tiers)
    field("model")["enum"] = sorted(models)
    props["stream"] = {"type": "boolean", "enum": [False], "default": False,
                       "description": "Accepted for compatibility; streaming is not supported"}
    side = r"(6[4-9]|[7-9]\d|[1-9]\d{2}|[1-3]\d{3}|40[0-8]\d|409[0-6])"  # 64..4096
    if limits.max_side == 4096:
        field("size")["pattern"] = rf"^(auto|{side}x{side})$"
    return schema


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "The same key and body within jobs.idempotency_ttl_s (24 h) get the first answer (or the same "
                   "job) instead of a second generation and charge; another body with the key is a 400",
    "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"}}
_JOB = {"type": "object", "required": ["id", "object", "status"], "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["image.job"]},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
    "data": _IMAGES["properties"]["data"], "error": {"type": "object"}, "backend": {"type": ["string", "null"]},
    "cost_usd": {"type": ["number", "null"]}, "decision_id": {"type": ["string", "null"]},
    "created_at": {"type": "number"}, "updated_at": {"type": "number"}, "finished_at": {"type": ["number", "null"]},
    "webhook": {"type": "object", "properties": {"url": {"type": "string"}, "state": {"type": ["string", "null"]}}},
}}


def _complete_jobs(paths: dict, generation: dict) -> None:
    body = copy.deepcopy(generation)
    body["properties"]["webhook_url"] = {
        "anyOf": [{"type": "string", "maxLength": 2048, "format": "uri"}, {"type": "null"}],
        "description": "Called once the job succeeds or fails (Standard Webhooks signature with the tenant's "
                       "secret); https and public hosts only unless the gateway allows others; null: none"}
    post_ = paths["/v1/images/jobs"]["post"]
    post_["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    post_["responses"]["202"] = {"description": "Accepted: the job, queued (Location: where to poll it)",
                                 "headers": {"location": {"schema": {"type": "string"}}},
                                 "content": {"application/json": {"schema": _JOB}}}
    for method in ("get", "delete"):
        paths["/v1/images/jobs/{job_id}"][method]["responses"]["200"] = {
            "description": "The job", "content": {"application/json": {"schema": _JOB}}}


def complete_openapi(doc: dict, settings: Settings, tiers: Iterable[str], models: Iterable[str]) -> dict:
    """Litestar's document, completed: error bodies, statuses, headers, limits, content types."""
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            given = op.get("responses", {})
            success = next((code for code in ("200", "201", "202") if code in given), "200")
            responses = {success: given.get(success) or {"description": "OK"}}
            for status in sorted(_statuses(method, path) | {405}):
                headers = _RETRY_HEADERS if status in (409, 429, 503) else {}
                responses[str(status)] = {"description": _WHY[status], "content": _JSON_ERROR,
                                          **({"headers": headers} if headers else {})}
            op["responses"] = responses
    gen = doc["paths"]["/v1/images/generations"]["post"]
    gen["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": _generation_schema(settings, tiers, models)}}}
    gen["responses"]["200"] = {"description": "The images (b64_json or url), OpenAI's shape",
                               "headers": _GATEWAY_HEADERS, "content": {"application/json": {"schema": _IMAGES}}}
    if "/v1/images/jobs" in doc["paths"]:
        _complete_jobs(doc["paths"], _generation_schema(settings, tiers, models))
    for op in (gen, doc["paths"].get("/v1/images/jobs", {}).get("post")):
        if op is not None:
            op.setdefault("parameters", []).append(_IDEMPOTENCY_KEY)
    files = doc["paths"]["/v1/images/files/{name}"]["get"]["responses"]
    files["200"] = {"description": "The image", "content": {
        m: {"schema": {"type": "string", "format": "binary"}} for m in ("image/png", "image/jpeg", "image/webp")}}
    export = doc["paths"]["/admin/audit/export"]["get"]["responses"]
    export["200"] = {"description": "Audit records, one JSON object a line",
                     "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}
    for path in ("/admin/policy", "/admin/policy/validate"):
        for method in ("put", "post"):
            if method in doc["paths"].get(path, {}):
                doc["paths"][path][method]["requestBody"] = _POLICY_BODY
    for op in (doc["paths"]["/admin/audit"]["get"],):
        for p in op.get("parameters", []):
            if p["name"] == "limit":
                p["schema"] = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
            if p["name"] == "cursor":
                p["schema"] = {"type": "string", "pattern": r"^\d+(\.\d+)?~[0-9a-f]{1,64}$"}
    for p in doc["paths"]["/admin/stats"]["get"].get("parameters", []):
        if p["name"] == "window_s":
            p["schema"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 31_622_400, "default": 3600}
    return doc
