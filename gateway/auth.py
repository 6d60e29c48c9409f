"""API keys: app keys map to tenants, admin keys to ops. Only SHA-256 hashes are kept.

Quick start: with no app keys configured, app requests may be anonymous (any or
no key is tenant "anonymous"); admin routes never are: without a configured
admin key, one is generated at start-up and printed once, as notebook servers do.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from .errors import Forbidden, Unauthorized

__all__ = ["KeyRing", "Principal", "admin_only", "hash_key"]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    role: Literal["app", "admin"]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, hashed: dict[str, Principal], anonymous_apps: bool):
        self._hashed = hashed
        self.anonymous_apps = anonymous_apps

    @classmethod
    def from_settings(cls, auth) -> tuple[KeyRing, str | None]:
        """The key ring, and a freshly generated admin key when none is configured (to print once)."""
        hashed = {entry.key_sha256.lower(): Principal(entry.tenant, entry.role) for entry in auth.keys}
        admin = auth.admin_key()
        generated = None
        if admin is None and not any(p.role == "admin" for p in hashed.values()):
            generated = admin = "igw-admin-" + secrets.token_urlsafe(24)
        if admin is not None:
            hashed[hash_key(admin)] = Principal("ops", "admin")
        has_app_keys = any(p.role == "app" for p in hashed.values())
        anonymous = auth.anonymous_apps if auth.anonymous_apps != "auto" else not has_app_keys
        return cls(hashed, anonymous), generated

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for a bearer key; None for no or unknown key (the caller decides)."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hash_key(key.strip())
        for known, principal in self._hashed.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    def app(self, authorization: str | None) -> Principal:
        principal = self.authenticate(authorization)
        if principal is not None:
            return principal
        if self.anonymous_apps:
            return Principal("anonymous", "app")
        raise Unauthorized("missing or unknown API key; send Authorization: Bearer <key>")

    def admin(self, authorization: str | None) -> Principal:
        principal = self.authenticate(authorization)
        if principal is None:
            raise Unauthorized("admin routes need an admin key: Authorization: Bearer <key>")
        if principal.role != "admin":
            raise Forbidden("this key is an app key; admin routes need an admin key")
        return principal


def admin_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Litestar guard for /admin routes."""
    keyring: KeyRing = connection.app.state.keyring
    connection.scope["principal"] = keyring.admin(connection.headers.get("authorization"))
