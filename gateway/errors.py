"""Errors the gateway answers with, and the one place they become HTTP responses.

    GatewayError                 base: status, OpenAI error type, code, param
    ├── InvalidRequest           400, names the offending field in `param`
    │   └── ContentPolicyViolation   400, every backend refused the content
    ├── Unauthorized             401, missing or unknown API key
    ├── Forbidden                403, an app key on an admin route
    ├── NotFound                 404
    ├── BudgetExceeded           429, the tenant is over its budget (policy: reject)
    ├── NoBackendAvailable       503, lists every rejected backend and why
    ├── AllBackendsFailed        502, lists every attempt and its error class
    └── DeadlineExceeded         504, the SLA budget ran out during attempts

Bodies follow OpenAI's shape, {"error": {"message", "type", "param", "code"}},
so the official SDKs raise their typed exceptions.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AllBackendsFailed",
    "BudgetExceeded",
    "ContentPolicyViolation",
    "DeadlineExceeded",
    "Forbidden",
    "GatewayError",
    "InvalidRequest",
    "NoBackendAvailable",
    "NotFound",
    "Unauthorized",
    "Conflict",
    "error_body",
]


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}
        # e.g. Retry-After, or x-should-retry: false where retrying cannot help (the OpenAI SDKs read both)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code, self.extra)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ContentPolicyViolation(InvalidRequest):
    code = "content_policy_violation"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class BudgetExceeded(GatewayError):
    status = 429
    type = "budget_exceeded"
    code = "budget_exceeded"


class NoBackendAvailable(GatewayError):
    status = 503
    type = "no_backend_available"
    code = "no_candidate"


class AllBackendsFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "all_backends_failed"


class DeadlineExceeded(GatewayError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **(extra or {})}}
