"""A broken backend is ejected, Envoy-style: for longer each time, never the last of a tier, back on a share."""

from __future__ import annotations

import dataclasses
import time

from backends.errors import BackendTransientError
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.ejection import EjectionCap, EjectionConfig, Ejector
from gateway.guard import BackendGuard
from policies.schema import Dispatch
from policies.types import Candidate, Decision
from tests.fakes import ScriptedBackend

JOB = GenerationJob(id="j1", prompt="p", width=64, height=64)


def decision(*names: str) -> Decision:
    return Decision(policy_version="v", tier="standard", sla_ms=10_000, max_cost_usd=None, objective="min_cost",
                    rule=None, rejected=(), reason="test",
                    candidates=tuple(Candidate(n, "m1", 10.0, 0.01, 0.8, 4) for n in names))


def fail(ejector: Ejector, times: int) -> None:
    for _ in range(times):
        ejector.on_failure("BackendTransientError")


def test_each_ejection_in_a_row_lasts_longer_up_to_the_cap():
    now = [0.0]
    e = Ejector("a", EjectionConfig(consecutive_failures=2, base_ejection_s=10, max_ejection_s=25,
                                    recovery_share=1.0), clock=lambda: now[0])
    lengths = []
    for _ in range(4):
        fail(e, 2)
        lengths.append(e.until - now[0])
        now[0] = e.until + 0.1  # ejection over; recovering, then a failure in a row ejects again
        fail(e, 2)
        lengths.append(e.until - now[0])
        now[0] = e.until + 0.1
    assert [round(x, 6) for x in lengths[:3]] == [10, 20, 25] and round(max(lengths), 6) == 25


def test_the_cap_keeps_a_share_of_a_tiers_candidates_and_never_ejects_the_last_one():
    cap = EjectionCap(50, groups=lambda: [frozenset("abcd"), frozenset("ab")])
    a, b, c, d = (Ejector(n, EjectionConfig(consecutive_failures=1), cap=cap) for n in "abcd")
    fail(a, 1)
    assert a.state == "ejected"
    fail(b, 1)  # b and a are tier two's only candidates: b is kept in service
    assert b.state == "serving" and "ejection cap" in b.reason
    fail(c, 1)  # half of abcd: a and c
    fail(d, 1)  # would be three of four: kept
    assert c.state == "ejected" and d.state == "serving"


def test_recovery_lets_a_growing_share_of_calls_through_not_a_single_probe():
    now = [0.0]
    e = Ejector("a", EjectionConfig(consecutive_failures=1, base_ejection_s=5, recovery_share=0.25),
                clock=lambda: now[0])
    fail(e, 1)
    assert not e.admit("other")
    now[0] = 6
    admitted = [e.admit(f"r{i}") for i in range(8)]
    assert admitted.count(True) == 2  # a quarter of the calls
    e.on_success()
    assert e.share == 0.5
    e.on_success()
    assert e.state == "serving"


def test_with_nowhere_else_to_go_a_recovering_backend_takes_the_call():
    now = [0.0]
    e = Ejector("a", EjectionConfig(consecutive_failures=1, base_ejection_s=5, recovery_share=0.01),
                clock=lambda: now[0])
    fail(e, 1)
    now[0] = 6
    assert not e.admit("r1") and e.admit("r1", last_resort=True)


async def test_a_requests_own_retry_is_never_refused_by_an_ejection_its_previous_attempt_caused():
    calls = []
    a = ScriptedBackend("a", fail=lambda j: BackendTransientError("500") if not calls.append(1) and len(calls) == 1
                        else None)
    guard = BackendGuard("a", ejection=EjectionConfig(consecutive_failures=1))
    attempts = []
    out = await Dispatcher({"a": a}, guards={"a": guard}).run(decision("a"), JOB, time.monotonic() + 5, attempts,
                                                              Dispatch(backoff_initial_ms=1))
    assert out.candidate.backend == "a" and [x.outcome for x in attempts] == ["error", "ok"]
    other = []
    b = ScriptedBackend("b")
    guard.ejector.eject("broken again", "someone-else")
    out = await Dispatcher({"a": a, "b": b}, guards={"a": guard}).run(
        decision("a", "b"), dataclasses.replace(JOB, id="j2"), time.monotonic() + 5, other)
    assert out.candidate.backend == "b" and other[0].outcome == "skipped"  # another request's ejection holds
