"""The policy in force, its versions, and how it changes: API edits, rollbacks and file reloads.

Every change is validated first and kept in history with who and when, durably
(gateway/policy_history.py: the file seeds it, API changes survive restarts, file
edits are new versions); requests already in flight finish under the version they
started with (they hold a reference to it). With Redis, each applied policy is
published and appended to a shared history; every other replica adopts it
(`adopt`), and a replica that (re)starts takes the shared history (`restore`).
A version is an integer (following the shared history's order) with the policy's
fingerprint beside it, in headers, the audit log and the admin API alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from policies.schema import Policy

from .config import ConfigError, parse_policy
from .policy_history import PolicyHistory

__all__ = ["PolicyRegistry", "PolicyVersion"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    version: int
    policy: Policy
    author: str
    at: float
    note: str = ""

    def summary(self) -> dict:
        return {"version": self.version, "fingerprint": self.policy.fingerprint, "author": self.author,
                "at": self.at, "note": self.note}

    def yaml(self) -> str:
        return yaml.safe_dump(self.policy.model_dump(mode="json"), sort_keys=False)


class PolicyRegistry:
    """Holds `current` (read once per request) and the ordered history of versions."""

    def __init__(self, policy: Policy, author: str = "startup", path: Path | None = None,
                 clock=time.time, store: PolicyHistory | None = None):
        self._clock = clock
        self._store = store
        self.path = path
        self.last_reload_error: str | None = None
        self._digest = self._read_digest()
        self._pending: str | None = None  # a changed digest seen once; applied when seen again (editor done)
        self._watcher: asyncio.Task | None = None
        self.on_apply = None  # called with each locally applied version (to share it with other replicas)
        stored = self._load(store)
        if not stored:
            self.history = [PolicyVersion(1, policy, author, clock(), "initial")]
            self._persist(self.history[0])
        else:
            self.history = stored
            edited = self._digest is not None and self._digest != store.file_digest()
            if edited and policy.fingerprint != self.current.fingerprint:
                self.apply(policy, "file", f"{path.name} changed while the gateway was stopped")
        if store is not None:
            store.set_file_digest(self._digest)

    @staticmethod
    def _load(store: PolicyHistory | None) -> list[PolicyVersion]:
        if store is None:
            return []
        try:
            return store.load()
        except Exception as exc:  # e.g. a stored version this release's schema no longer reads
            log.error("policy history %s unreadable (%s): starting a new history from the policy file",
                      store.path, exc)
            return []

    def _persist(self, entry: PolicyVersion) -> None:
        if self._store is not None:
            try:
                self._store.append(entry)
            except Exception:  # the policy still applies; its history entry is what is lost
                log.exception("policy v%d could not be written to the history file", entry.version)

    @property
    def current(self) -> Policy:
        return self.history[-1].policy

    @property
    def version(self) -> PolicyVersion:
        return self.history[-1]

    def apply(self, policy: Policy, author: str, note: str = "", *, shared: bool = False) -> PolicyVersion:
        """Make `policy` current; `shared` marks one received from another replica (not re-announced)."""
        entry = PolicyVersion(self.history[-1].version + 1, policy, author, self._clock(), note)
        self.history.append(entry)
        self._persist(entry)
        log.info("policy v%d (%s) applied by %s %s", entry.version, policy.fingerprint, author, note)
        if self.on_apply is not None and not shared:
            self.on_apply(entry)
        return entry

    def restore(self, payloads: list[dict]) -> None:
        """Take the shared history (oldest first) as this replica's, ending with the policy in force."""
        restored = []
        for i, p in enumerate(payloads, start=1):
            restored.append(PolicyVersion(i, Policy.model_validate(p["policy"]), p.get("author", "?"),
                                          p.get("at", 0.0), p.get("note", "")))
        if restored:
            self.history = restored
            if self._store is not None:
                self._store.replace(restored)

    def adopt(self, payload: dict) -> PolicyVersion | None:
        """Apply a policy another replica published, unless it is already in force."""
        policy = Policy.model_validate(payload["policy"])
        if policy.fingerprint == self.current.fingerprint:
            return None
        return self.apply(policy, f"{payload.get('author', '?')} (via replica)", payload.get("note", ""),
                          shared=True)

    def get(self, version: int) -> PolicyVersion | None:
        return next((v for v in self.history if v.version == version), None)

    def rollback(self, version: int, author: str) -> PolicyVersion | None:
        target = self.get(version)
        if target is None:
            return None
        return self.apply(target.policy, author, f"rollback to v{version}")

    def diff(self, a: int, b: int) -> str | None:
        va, vb = self.get(a), self.get(b)
        if va is None or vb is None:
            return None
        return "".join(difflib.unified_diff(va.yaml().splitlines(True), vb.yaml().splitlines(True),
                                            f"v{a}", f"v{b}"))

    # --- the file on disk -------------------------------------------------------------

    def reload_if_changed(self) -> PolicyVersion | None:
        """Apply policy.yaml if it changed and is valid; an invalid file is refused and the policy stays."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            self._pending = None
            return None
        if digest != self._pending:  # still being written? wait for the same content on the next poll
            self._pending = digest
            return None
        self._digest, self._pending = digest, None
        if self._store is not None:
            self._store.set_file_digest(digest)
        try:
            text = self.path.read_text()
            if not text.strip():
                raise ConfigError(str(self.path), ["(root): the file is empty"])
            policy = parse_policy(text, str(self.path))
        except ConfigError as exc:
            self.last_reload_error = exc.render()
            log.error("policy file edit refused, v%d stays in force:\n%s", self.version.version, exc.render())
            return None
        self.last_reload_error = None
        if policy.fingerprint == self.current.fingerprint:
            return None
        return self.apply(policy, "file", f"reloaded {self.path.name}")

    def _read_digest(self) -> str | None:
        # Content, not mtime: two edits inside one timestamp tick must not look like one.
        if self.path is None or not self.path.exists():
            return None
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    async def watch(self, interval_s: float) -> None:
        self._watcher = asyncio.create_task(self._poll(interval_s), name="policy-file-watch")

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.reload_if_changed)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
