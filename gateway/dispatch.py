"""Runs a Decision: candidates best-first, retries where safe, breakers, hedging, all within the deadline.

Deciding is `policies.decide`; this module only carries it out and records
every attempt, so the audit log can say what happened and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from backends.errors import (
    BackendError,
    BackendPaced,
    BackendRateLimited,
    BackendTimeout,
    BackendTransientError,
    BackendUnavailable,
    ContentRefused,
)
from backends.protocol import Backend, GenerationJob, GenerationResult
from policies.schema import Dispatch
from policies.types import Candidate, Decision

from .errors import AllBackendsFailed, ContentPolicyViolation, DeadlineExceeded, NoBackendAvailable
from .guard import BackendGuard

__all__ = ["Attempt", "DispatchOutcome", "Dispatcher"]

log = logging.getLogger(__name__)

_BACKSTOP_S = 0.05  # how long past the deadline a backend that ignores it is given before it is stopped


@dataclass(slots=True)
class Attempt:
    backend: str
    model: str
    started_ms: float  # since the dispatch began
    latency_ms: float = 0.0
    outcome: str = "pending"  # ok | error | timeout | skipped (guard refused) | paced (held back) | cancelled
    error_class: str | None = None
    error: str | None = None
    hedge: bool = False

    def as_record(self) -> dict:
        # Spelled out: dataclasses.asdict deep-copies every value (once per attempt on the request path).
        return {"backend": self.backend, "model": self.model, "started_ms": self.started_ms,
                "latency_ms": self.latency_ms, "outcome": self.outcome, "error_class": self.error_class,
                "error": self.error, "hedge": self.hedge}


@dataclass(slots=True)
class DispatchOutcome:
    candidate: Candidate
    result: GenerationResult
    attempts: list[Attempt] = field(default_factory=list)
    hedge_cost_usd: float = 0.0  # what a cancelled hedge may still have cost


class _Skipped(BackendUnavailable):
    """The guard refused the call (breaker open, at capacity, rpm): no request was sent."""


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, BackendError) and exc.retryable and not isinstance(exc, _Skipped)


def _wait_for(base: Callable) -> Callable:
    """tenacity wait: the provider's Retry-After when it gave one, else jittered exponential."""

    def wait(state) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, BackendRateLimited) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return base(state)

    return wait


class Dispatcher:
    """Tries candidates best-first; falls back on failure; never outlives the deadline."""

    def __init__(self, backends: Mapping[str, Backend], guards: Mapping[str, BackendGuard] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 redact: Callable[[str], str] | None = None):
        self._backends = backends
        self._guards = guards or {}
        self._redact = redact  # scrubs secrets out of upstream error text
        self._clock = clock
        self._sleep = sleep

    async def run(self, decision: Decision, job: GenerationJob, deadline: float, attempts: list[Attempt],
                  dispatch: Dispatch = Dispatch()) -> DispatchOutcome:
        """Images from the first candidate that delivers; `attempts` is filled as they happen."""
        began = self._clock()
        last_error: BackendError | None = None
        queue = list(decision.candidates)
        while queue and self._clock() < deadline:
            candidate = queue.pop(0)
            hedge_with, hedge_after_ms = decision.hedge_partner(candidate, queue), candidate.predicted_latency_ms
            if hedge_with is None and dispatch.hedge_at_p99 and candidate.p99_ms is not None:
                # No answer by its p99: the next candidate starts too (the same backend again when it is the
                # last: a hung call must not take the request down with it), if the cost ceiling pays for both.
                hedge_with = decision.hedge_partner(candidate, queue or [candidate], hedging=True)
                hedge_after_ms = max(candidate.p99_ms, candidate.predicted_latency_ms)
            try:
                if hedge_with is not None:
                    if hedge_with is not candidate:
                        queue.remove(hedge_with)
                    due = min(deadline, began + decision.sla_ms / 1000)
                    return await self._hedged(candidate, hedge_with, job, deadline, attempts, began, dispatch,
                                              hedge_after_ms, due, last_resort=not queue)
                cap = self._attempt_deadline(candidate, queue, deadline) if dispatch.attempt_budget else deadline
                result = await self._with_retries(candidate, job, cap, attempts, began, dispatch,
                                                  last_resort=not queue)
                return DispatchOutcome(candidate, result, attempts)
            except BackendError as exc:
                last_error = exc
                if isinstance(exc, ContentRefused) and not dispatch.fallback_on_content_refusal:
                    break
        raise self._failure(attempts, last_error)

    def _attempt_deadline(self, candidate: Candidate, rest: list[Candidate], deadline: float) -> float:
        """How long an API attempt may take: what leaves the next candidate its predicted latency before the
        deadline. Queueing backends (the pool) keep the whole deadline: late binding hands their jobs back; a
        probe (a pool trying a shape it never measured) is bounded like an API attempt."""
        if not rest or (candidate.p99_ms is None and not candidate.probe):
            return deadline
        cap = deadline - rest[0].predicted_latency_ms / 1000
        return cap if cap > self._clock() else deadline  # the next one cannot make it anyway: take it all

    async def _with_retries(self, candidate: Candidate, job: GenerationJob, deadline: float,
                            attempts: list[Attempt], began: float, dispatch: Dispatch,
                            hedge: bool = False, last_resort: bool = False) -> GenerationResult:
        # The first try runs bare: it almost always succeeds, and tenacity's bookkeeping (its retry object,
        # strategies and per-try state) cost ~6% of the gateway's CPU per request. Only a retryable failure
        # brings tenacity in, which sees that failure as its own first attempt.
        tries = max(dispatch.max_attempts_per_backend, dispatch.last_candidate_attempts) if last_resort \
            else dispatch.max_attempts_per_backend
        try:
            return await self._attempt(candidate, job, deadline, attempts, began, hedge, last_resort)
        except BaseException as exc:
            if not _retryable(exc) or tries <= 1:
                raise
            first_error = exc

        def past_deadline(state) -> bool:
            return self._clock() + state.upcoming_sleep >= deadline

        retrying = AsyncRetrying(
            stop=stop_after_attempt(tries) | past_deadline,
            wait=_wait_for(wait_random_exponential(multiplier=dispatch.backoff_initial_ms / 1000,
                                                   max=dispatch.backoff_max_ms / 1000)),
            retry=retry_if_exception(_retryable),
            sleep=self._sleep,
            reraise=True,
        )
        async for try_ in retrying:
            with try_:
                if first_error is not None:  # tenacity counts the bare first try and waits as it says
                    error, first_error = first_error, None
                    raise error
                return await self._attempt(candidate, job, deadline, attempts, began, hedge, last_resort)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, candidate: Candidate, job: GenerationJob, deadline: float,
                       attempts: list[Attempt], began: float, hedge: bool, last_resort: bool) -> GenerationResult:
        attempt = Attempt(candidate.backend, candidate.model, (self._clock() - began) * 1000, hedge=hedge)
        attempts.append(attempt)
        guard = self._guards.get(candidate.backend)
        refusal = guard.admit(job.id, last_resort) if guard else None
        if refusal is not None:
            self._close(attempt, began, "skipped", _Skipped(refusal))
            raise _Skipped(f"{candidate.backend}: {refusal}")
        error: BaseException | None = None
        try:
            result = await self._call(candidate, job, deadline, began)
        except BaseException as exc:
            error = exc
            if isinstance(exc, BackendError) and self._redact is not None:
                exc.message = self._redact(exc.message)  # before the guard, audit, logs or the client see it
                exc.args = (exc.message,)
            if isinstance(exc, asyncio.CancelledError):
                self._close(attempt, began, "cancelled")
            elif isinstance(exc, BackendPaced):
                self._close(attempt, began, "paced", exc)  # our own pacing held it back: nothing was sent
            else:
                self._close(attempt, began, "timeout" if isinstance(exc, BackendTimeout) else "error", exc)
            raise
        finally:
            if guard:
                guard.release(error, job.id)
        self._close(attempt, began, "ok")
        return result

    async def _call(self, candidate: Candidate, job: GenerationJob, deadline: float,
                    began: float) -> GenerationResult:
        backend = self._backends[candidate.backend]
        start_by = None if candidate.start_within_ms is None else began + candidate.start_within_ms / 1000
        job = dataclasses.replace(job, model=candidate.model, steps=candidate.steps, start_by=start_by,
                                  preempts=candidate.preempts)
        try:
            # Backends keep their own deadline and say what ran out (a job still queued in the pool is a busy
            # backend, not a broken one): this timer, a little later, only stops one that does not.
            async with asyncio.timeout(max(0.0, deadline - self._clock()) + _BACKSTOP_S):
                result = await backend.generate(job, deadline)
        except TimeoutError as exc:
            raise BackendTimeout(f"{candidate.backend} did not answer before the deadline") from exc
        except BackendError:
            raise
        except Exception as exc:  # a bug in a backend must not crash the request
            log.exception("backend %s raised unexpectedly", candidate.backend)
            raise BackendTransientError(f"{candidate.backend} failed: {type(exc).__name__}") from exc
        if len(result.images) != job.n:
            raise BackendTransientError(f"{candidate.backend} returned {len(result.images)} images, expected {job.n}")
        return result

    async def _hedged(self, first: Candidate, second: Candidate, job: GenerationJob, deadline: float,
                      attempts: list[Attempt], began: float, dispatch: Dispatch, hedge_after_ms: float,
                      due: float, last_resort: bool) -> DispatchOutcome:
        """Start `second` if `first` has not answered `hedge_after_ms` into the request (and, where `first` is a
        queue that can tell, it predicts a finish late for `due`); the first success wins."""

        def start(candidate: Candidate, hedge: bool) -> asyncio.Task:
            return asyncio.create_task(self._with_retries(candidate, job, deadline, attempts, began, dispatch, hedge,
                                                          last_resort))

        primary_started = self._clock()
        primary = start(first, False)
        tasks = {primary: first}
        errors: list[BaseException] = []
        try:
            # counted from this candidate's own start: a later candidate (after a failure) gets its full p99
            hedge_in = max(0.0, hedge_after_ms / 1000 - (self._clock() - primary_started))
            done, _ = await asyncio.wait({primary}, timeout=hedge_in)
            if primary not in done and not self._hedge_pays(first, job, due):
                done, _ = await asyncio.wait({primary})  # predicted on time: the second only if it fails
            if primary in done:
                if primary.exception() is None:
                    return DispatchOutcome(first, primary.result(), attempts)
                errors.append(primary.exception())
                del tasks[primary]
                if second is first:  # it failed, retries spent: a hedge on itself would only repeat them
                    raise primary.exception()
            guard = self._guards.get(first.backend)
            if second is first and guard is not None and guard.pacer.paced:
                return DispatchOutcome(first, await primary, attempts)  # it asked us to slow down: no second call
            tasks[start(second, primary not in done)] = second
            while tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    candidate = tasks.pop(task)
                    if task.exception() is None:
                        return DispatchOutcome(candidate, task.result(), attempts,
                                               hedge_cost_usd=self._loser_cost(tasks))
                    errors.append(task.exception())
            raise errors[-1]
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    def _hedge_pays(self, first: Candidate, job: GenerationJob, due: float) -> bool:
        """A queueing backend (the pool) says whether its job is now predicted late enough to race; any other
        has passed its predicted latency, which is all there is to know."""
        asks = getattr(self._backends.get(first.backend), "hedge_pays", None)
        return asks is None or asks(job.id, due)

    @staticmethod
    def _loser_cost(tasks: dict) -> float:
        # An API call cancelled mid-flight may still be billed: account its predicted cost.
        return sum(c.predicted_cost_usd for c in tasks.values())

    def _close(self, attempt: Attempt, began: float, outcome: str, exc: BackendError | None = None):
        attempt.latency_ms = (self._clock() - began) * 1000 - attempt.started_ms
        attempt.outcome = outcome
        if exc is not None:
            attempt.error_class, attempt.error = exc.kind, exc.message

    @staticmethod
    def _failure(attempts: list[Attempt], last_error: BackendError | None):
        tried = [a.as_record() for a in attempts]
        sent = [a for a in attempts if a.outcome not in ("skipped", "paced")]
        if isinstance(last_error, ContentRefused):
            return ContentPolicyViolation(f"refused by content policy: {last_error.message}", param="prompt",
                                          extra={"attempts": tried})
        if not attempts or (sent and all(a.outcome == "timeout" for a in sent)):
            return DeadlineExceeded("the request's deadline passed before any backend delivered",
                                    extra={"attempts": tried})
        if not sent:  # held back by caps, pacing or ejections: all of which pass
            return NoBackendAvailable("every candidate backend is at capacity, paced or ejected",
                                      extra={"attempts": tried}, headers={"retry-after": "1"})
        return AllBackendsFailed(
            f"all {len({a.backend for a in attempts})} candidate backend(s) failed; "
            f"last: {last_error.message if last_error else '?'}", extra={"attempts": tried})
