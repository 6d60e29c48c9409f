"""The dispatcher tries candidates in order, falls back on failure and respects the deadline."""

from __future__ import annotations

import dataclasses
import time

import pytest

from backends.errors import BackendAuthError, BackendRateLimited, BackendTransientError, ContentRefused
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.ejection import EjectionConfig
from gateway.errors import AllBackendsFailed, ContentPolicyViolation, DeadlineExceeded
from gateway.guard import BackendGuard
from policies.schema import Dispatch
from policies.types import BackendKind, Candidate, Decision
from tests.fakes import ScriptedBackend

JOB = GenerationJob(id="j1", prompt="p", width=64, height=64)


def decision(*names: str, hedge: bool = False, latency_ms: float = 10.0, max_cost: float | None = None) -> Decision:
    return Decision(policy_version="v", tier="standard", sla_ms=1000, max_cost_usd=max_cost, objective="min_cost",
                    rule=None, rejected=(), reason="test", hedge=hedge,
                    candidates=tuple(Candidate(n, "m1", latency_ms, 0.01, 0.8, 4) for n in names))


async def test_first_candidate_serves_when_it_can():
    a, b = ScriptedBackend("a"), ScriptedBackend("b")
    attempts = []
    out = await Dispatcher({"a": a, "b": b}).run(decision("a", "b"), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "a" and len(out.result.images) == 1
    assert [x.outcome for x in attempts] == ["ok"] and not b.calls


async def test_failure_falls_back_down_the_ranked_list_and_records_each_attempt():
    a = ScriptedBackend("a", fail=lambda j: BackendTransientError("503 upstream"))
    b = ScriptedBackend("b", fail=lambda j: BackendAuthError("401"))
    c = ScriptedBackend("c")
    attempts = []
    out = await Dispatcher({"a": a, "b": b, "c": c}).run(decision("a", "b", "c"), JOB, time.monotonic() + 5,
                                                         attempts)
    assert out.candidate.backend == "c"
    assert [(x.backend, x.outcome, x.error_class) for x in attempts] == [
        ("a", "error", "BackendTransientError"), ("a", "error", "BackendTransientError"),  # retried once
        ("b", "error", "BackendAuthError"),  # not retried
        ("c", "ok", None)]


async def test_slow_backend_is_cut_at_the_deadline():
    slow = ScriptedBackend("slow", delay_s=5)
    attempts = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await Dispatcher({"slow": slow}).run(decision("slow"), JOB, time.monotonic() + 0.2, attempts)
    assert time.monotonic() - started < 1.0
    assert attempts[0].outcome == "timeout"


async def test_all_failing_is_a_502_with_every_attempt():
    a = ScriptedBackend("a", fail=lambda j: BackendTransientError("x"))
    with pytest.raises(AllBackendsFailed) as err:
        await Dispatcher({"a": a}).run(decision("a"), JOB, time.monotonic() + 5, [])
    assert err.value.status == 502 and err.value.extra["attempts"][0]["backend"] == "a"


async def test_content_refusal_is_a_400_and_does_not_fall_back_unless_the_policy_says_so():
    a = ScriptedBackend("a", fail=lambda j: ContentRefused("nope"))
    b = ScriptedBackend("b")
    with pytest.raises(ContentPolicyViolation) as err:
        await Dispatcher({"a": a, "b": b}).run(decision("a", "b"), JOB, time.monotonic() + 5, [])
    assert err.value.status == 400 and not b.calls
    out = await Dispatcher({"a": a, "b": b}).run(decision("a", "b"), JOB, time.monotonic() + 5, [],
                                                 Dispatch(fallback_on_content_refusal=True))
    assert out.candidate.backend == "b"


async def test_a_backend_bug_becomes_a_transient_error_not_a_crash():
    class Broken(ScriptedBackend):
        async def generate(self, job, deadline):
            raise KeyError("bug")

    attempts = []
    out = await Dispatcher({"a": Broken("a"), "b": ScriptedBackend("b")}).run(
        decision("a", "b"), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "b" and attempts[0].error_class == "BackendTransientError"


async def test_wrong_image_count_is_a_failure():
    class Short(ScriptedBackend):
        async def generate(self, job, deadline):
            res = await super().generate(job, deadline)
            return type(res)(images=res.images[:1], model=res.model, width=res.width, height=res.height)

    attempts = []
    job = GenerationJob(id="j", prompt="p", width=64, height=64, n=3)
    out = await Dispatcher({"a": Short("a"), "b": ScriptedBackend("b")}).run(
        decision("a", "b"), job, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "b" and len(out.result.images) == 3


async def test_retry_waits_for_retry_after_when_the_deadline_allows():
    calls = []
    a = ScriptedBackend("a", fail=lambda j: BackendRateLimited("429", retry_after_s=0.3) if not calls.append(1)
                        and len(calls) == 1 else None)
    slept = []

    async def sleep(s):
        slept.append(s)

    attempts = []
    out = await Dispatcher({"a": a}, sleep=sleep).run(decision("a"), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "a" and slept == [0.3]
    assert [x.outcome for x in attempts] == ["error", "ok"]


async def test_retry_after_beyond_the_deadline_falls_back_at_once():
    a = ScriptedBackend("a", fail=lambda j: BackendRateLimited("429", retry_after_s=60))
    b = ScriptedBackend("b")
    attempts = []
    out = await Dispatcher({"a": a, "b": b}).run(decision("a", "b"), JOB, time.monotonic() + 2, attempts)
    assert out.candidate.backend == "b" and len(a.calls) == 1


async def test_hedge_starts_the_next_candidate_when_the_first_is_late_and_cancels_the_loser():
    slow, fast = ScriptedBackend("slow", delay_s=2), ScriptedBackend("fast", delay_s=0.05)
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"slow": slow, "fast": fast}).run(
        decision("slow", "fast", hedge=True, latency_ms=100), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "fast" and time.monotonic() - started < 1
    assert {(a.backend, a.outcome, a.hedge) for a in attempts} == {("slow", "cancelled", False), ("fast", "ok", True)}
    assert out.hedge_cost_usd == pytest.approx(0.01)  # the cancelled call may still be billed


async def test_no_hedge_when_the_first_answers_in_time_or_the_cost_cap_cannot_pay_for_both():
    a, b = ScriptedBackend("a", delay_s=0.01), ScriptedBackend("b")
    out = await Dispatcher({"a": a, "b": b}).run(decision("a", "b", hedge=True, latency_ms=500), JOB,
                                                 time.monotonic() + 5, [])
    assert out.candidate.backend == "a" and not b.calls
    slow = ScriptedBackend("slow", delay_s=0.3)
    attempts = []
    out = await Dispatcher({"slow": slow, "b": b}).run(
        decision("slow", "b", hedge=True, latency_ms=10, max_cost=0.015), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "slow" and not b.calls


async def test_consecutive_failures_eject_a_backend_and_it_recovers_on_a_share_of_traffic():
    now = [0.0]
    guard = BackendGuard("a", ejection=EjectionConfig(consecutive_failures=3, base_ejection_s=10,
                                                      recovery_share=0.5), clock=lambda: now[0])
    broken = [True]
    a = ScriptedBackend("a", fail=lambda j: BackendTransientError("500") if broken[0] else None)
    b = ScriptedBackend("b")
    dispatcher = Dispatcher({"a": a, "b": b}, guards={"a": guard}, clock=lambda: now[0])
    ids = iter(range(100))

    def job():  # each run its own request (a request's own retry passes an ejection it caused)
        return dataclasses.replace(JOB, id=f"r{next(ids)}")

    one = Dispatch(max_attempts_per_backend=1)
    for _ in range(3):
        await dispatcher.run(decision("a", "b"), job(), 100, [], one)
    assert guard.ejector.state == "ejected" and len(a.calls) == 3
    attempts = []
    out = await dispatcher.run(decision("a", "b"), job(), 100, attempts, one)
    assert out.candidate.backend == "b" and attempts[0].outcome == "skipped" and len(a.calls) == 3
    now[0] = 11  # ejection over: recovering, half the calls go through; successes bring it back in full
    broken[0] = False
    served = [(await dispatcher.run(decision("a", "b"), job(), 100, [], one)).candidate.backend for _ in range(4)]
    assert served.count("a") >= 1 and served.count("b") >= 1
    assert guard.ejector.state == "serving"


async def test_concurrency_cap_sends_the_overflow_elsewhere():
    guard = BackendGuard(max_concurrency=1)
    a, b = ScriptedBackend("a", delay_s=0.2), ScriptedBackend("b")
    dispatcher = Dispatcher({"a": a, "b": b}, guards={"a": guard})
    import asyncio

    first, second = await asyncio.gather(
        dispatcher.run(decision("a", "b"), JOB, time.monotonic() + 5, []),
        dispatcher.run(decision("a", "b"), JOB, time.monotonic() + 5, []))
    assert {first.candidate.backend, second.candidate.backend} == {"a", "b"}
    assert guard.inflight == 0


class _Queue(ScriptedBackend):
    """A queueing backend that says whether its job is predicted late (as the local pool does)."""

    def __init__(self, name: str, *, late: bool, **kw):
        super().__init__(name, **kw)
        self.late, self.asked = late, []

    def hedge_pays(self, job_id: str, due: float) -> bool:
        self.asked.append((job_id, due))
        return self.late


async def test_a_queue_that_predicts_its_job_on_time_is_not_raced_past_its_predicted_latency():
    pool, api = _Queue("local", late=False, delay_s=0.3), ScriptedBackend("reve")
    started = time.monotonic()
    out = await Dispatcher({"local": pool, "reve": api}).run(
        decision("local", "reve", hedge=True, latency_ms=50), JOB, started + 5, [])
    assert out.candidate.backend == "local" and not api.calls and out.hedge_cost_usd == 0
    (job_id, due), = pool.asked
    assert job_id == JOB.id and due == pytest.approx(started + 1.0, abs=0.05)  # the SLA (1 s), not the deadline


async def test_a_queue_that_predicts_its_job_late_is_raced_and_one_on_time_that_fails_still_falls_back():
    pool, api = _Queue("local", late=True, delay_s=2), ScriptedBackend("reve", delay_s=0.05)
    out = await Dispatcher({"local": pool, "reve": api}).run(
        decision("local", "reve", hedge=True, latency_ms=50), JOB, time.monotonic() + 5, [])
    assert out.candidate.backend == "reve" and len(pool.asked) == 1
    failing = _Queue("local", late=False, delay_s=0.2, kind=BackendKind.LOCAL,
                     fail=lambda j: BackendAuthError("worker lost"))
    attempts = []
    out = await Dispatcher({"local": failing, "reve": api}).run(
        decision("local", "reve", hedge=True, latency_ms=50), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "reve" and [a.backend for a in attempts] == ["local", "reve"]
