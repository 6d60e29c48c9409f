"""Runs a Decision: attempts the ranked candidates in order within the deadline.

Deciding is `policies.decide`; this module only carries it out and records
every attempt, so the audit log can say what happened and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from backends.errors import BackendError, BackendTimeout, BackendTransientError, ContentRefused
from backends.protocol import Backend, GenerationJob, GenerationResult
from policies.types import Candidate, Decision

from .errors import AllBackendsFailed, ContentPolicyViolation, DeadlineExceeded

__all__ = ["Attempt", "DispatchOutcome", "Dispatcher"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    backend: str
    model: str
    started_ms: float  # since the dispatch began
    latency_ms: float = 0.0
    outcome: str = "pending"  # ok | error | timeout
    error_class: str | None = None
    error: str | None = None

    def as_record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class DispatchOutcome:
    candidate: Candidate
    result: GenerationResult
    attempts: list[Attempt] = field(default_factory=list)


class Dispatcher:
    """Tries candidates best-first; falls back on failure; never outlives the deadline."""

    def __init__(self, backends: Mapping[str, Backend], clock: Callable[[], float] = time.monotonic):
        self._backends = backends
        self._clock = clock

    async def run(self, decision: Decision, job: GenerationJob, deadline: float,
                  attempts: list[Attempt]) -> DispatchOutcome:
        """Images from the first candidate that delivers; `attempts` is filled as they happen."""
        began = self._clock()
        last_error: BackendError | None = None
        for candidate in decision.candidates:
            if self._clock() >= deadline:
                break
            attempt = Attempt(candidate.backend, candidate.model, (self._clock() - began) * 1000)
            attempts.append(attempt)
            try:
                result = await self._attempt(candidate, job, deadline)
            except BackendError as exc:
                self._close(attempt, began, "timeout" if isinstance(exc, BackendTimeout) else "error", exc)
                last_error = exc
                continue
            self._close(attempt, began, "ok")
            return DispatchOutcome(candidate, result, attempts)
        raise self._failure(attempts, last_error)

    async def _attempt(self, candidate: Candidate, job: GenerationJob, deadline: float) -> GenerationResult:
        backend = self._backends[candidate.backend]
        job = dataclasses.replace(job, model=candidate.model, steps=candidate.steps)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                result = await backend.generate(job, deadline)
        except TimeoutError as exc:
            raise BackendTimeout(f"{candidate.backend} did not answer before the deadline") from exc
        except BackendError:
            raise
        except Exception as exc:  # a bug in a backend must not crash the request
            log.exception("backend %s raised unexpectedly", candidate.backend)
            raise BackendTransientError(f"{candidate.backend} failed: {type(exc).__name__}") from exc
        if len(result.images) != job.n:
            raise BackendTransientError(
                f"{candidate.backend} returned {len(result.images)} images, expected {job.n}"
            )
        return result

    def _close(self, attempt: Attempt, began: float, outcome: str, exc: BackendError | None = None):
        attempt.latency_ms = (self._clock() - began) * 1000 - attempt.started_ms
        attempt.outcome = outcome
        if exc is not None:
            attempt.error_class, attempt.error = exc.kind, exc.message

    @staticmethod
    def _failure(attempts: list[Attempt], last_error: BackendError | None):
        tried = [a.as_record() for a in attempts]
        if attempts and all(a.outcome == "timeout" for a in attempts) or not attempts:
            return DeadlineExceeded(
                "the request's deadline passed before any backend delivered",
                extra={"attempts": tried},
            )
        if isinstance(last_error, ContentRefused):
            return ContentPolicyViolation(
                f"refused by content policy: {last_error.message}", param="prompt",
                extra={"attempts": tried},
            )
        return AllBackendsFailed(
            f"all {len(attempts)} candidate backend(s) failed; last: {last_error.message if last_error else '?'}",
            extra={"attempts": tried},
        )
