"""The dispatcher tries candidates in order, falls back on failure and respects the deadline."""

from __future__ import annotations

import time

import pytest

from backends.errors import BackendAuthError, BackendTransientError, ContentRefused
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.errors import AllBackendsFailed, ContentPolicyViolation, DeadlineExceeded
from policies.types import Candidate, Decision
from tests.fakes import ScriptedBackend

JOB = GenerationJob(id="j1", prompt="p", width=64, height=64)


def decision(*names: str) -> Decision:
    return Decision(policy_version="v", tier="standard", sla_ms=1000, max_cost_usd=None, objective="min_cost",
                    rule=None, rejected=(), reason="test",
                    candidates=tuple(Candidate(n, "m1", 10.0, 0.01, 0.8, 4) for n in names))


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
        ("a", "error", "BackendTransientError"), ("b", "error", "BackendAuthError"), ("c", "ok", None)]


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


async def test_content_refusal_everywhere_is_a_400_content_policy_error():
    a = ScriptedBackend("a", fail=lambda j: ContentRefused("nope"))
    with pytest.raises(ContentPolicyViolation) as err:
        await Dispatcher({"a": a}).run(decision("a"), JOB, time.monotonic() + 5, [])
    assert err.value.status == 400


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
