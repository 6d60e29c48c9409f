"""Secrets never leave the process: every configured key value, and anything shaped like a bearer token or
an API key, is scrubbed from text before it reaches a client, the audit log, logs or a status page.

Upstreams that echo request headers in their error bodies would otherwise hand a provider key to the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor", "ScrubbingFormatter"]

REDACTED = "[REDACTED]"

# Shapes of credentials seen in provider answers and headers (key values are also matched exactly).
_SHAPES = re.compile(
    r"(?i)(?:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"  # Authorization header values
    r"|\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"  # OpenAI-style keys
    r"|\bAIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|\bey[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JWTs
    r"|(?<![A-Za-z0-9])(?:api[_-]?key|api[_-]?token|x-goog-api-key|access[_-]?token|secret|password)"
    r"""(["']?\s*[:=]\s*["']?)[^\s"',;}&]{6,}"""  # key=value, "api_token": "..."
)


def _replace(match: re.Match) -> str:
    sep = match.group(1)
    if sep is not None:  # keep the name, drop the value
        return match.group(0)[: match.start(1) - match.start(0)] + sep + REDACTED
    return REDACTED


class Redactor:
    """`redact(text)`: the text with every known secret and credential-shaped token replaced."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        # Longest first, so a key that contains another is replaced whole; short values would match words.
        self._secrets = sorted({*self._secrets, *(s for s in secrets if s and len(s) >= 6)}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _SHAPES.sub(_replace, text)


class ScrubbingFormatter(logging.Formatter):
    """A log formatter whose every line (message and traceback) passes through a Redactor."""

    def __init__(self, redactor: Redactor, fmt: str | None = None, datefmt: str | None = None):
        super().__init__(fmt, datefmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))
