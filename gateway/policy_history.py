"""Every policy version, durable: a SQLite file in the data folder (policy_history.sqlite3).

It also remembers the policy file's content digest as last seen, which is the rule between the file and
the API: the file seeds the history; an API change (PUT, rollback) is a new version that survives restarts;
an edit of the file (while the gateway runs, or while it was stopped) is a new version too, authored "file".
A file nobody touched never replaces what the API set.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from policies.schema import Policy

__all__ = ["PolicyHistory"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, author TEXT,
                                     at REAL, note TEXT, policy TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class PolicyHistory:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5)

    def load(self) -> list:
        from .policy_admin import PolicyVersion

        with self._connect() as conn:
            rows = conn.execute("SELECT version, author, at, note, policy FROM versions ORDER BY version").fetchall()
        return [PolicyVersion(v, Policy.model_validate(json.loads(p)), a or "?", at or 0.0, n or "")
                for v, a, at, n, p in rows]

    def append(self, entry) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                         (entry.version, entry.policy.fingerprint, entry.author, entry.at, entry.note,
                          json.dumps(entry.policy.model_dump(mode="json"))))

    def replace(self, entries: list) -> None:
        """Take another history whole (the fleet's, from Redis)."""
        with self._connect() as conn:
            conn.execute("DELETE FROM versions")
        for entry in entries:
            self.append(entry)

    def file_digest(self) -> str | None:
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'file_digest'").fetchone()
        return row[0] if row else None

    def set_file_digest(self, digest: str | None) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('file_digest', ?)", (digest,))
