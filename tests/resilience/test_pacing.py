"""A provider saying "slow down" paces it: calls wait their turn or go elsewhere, and it is never ejected."""

from __future__ import annotations

import dataclasses
import time

import pytest
import respx
from pydantic import SecretStr

from backends.errors import BackendRateLimited
from backends.maas import BriaBackend, ProviderConfig
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.guard import BackendGuard
from gateway.pacing import Pacer, RateWindow
from policies.types import Candidate, Decision
from tests.fakes import ScriptedBackend

JOB = GenerationJob(id="j1", prompt="p", width=1024, height=1024)


def decision(*names: str, sla_ms: int = 10_000, latency_ms: float = 100.0) -> Decision:
    return Decision(policy_version="v", tier="standard", sla_ms=sla_ms, max_cost_usd=None, objective="min_cost",
                    rule=None, rejected=(), reason="test",
                    candidates=tuple(Candidate(n, "m1", latency_ms, 0.01, 0.8, 4, p99_ms=latency_ms * 50)
                                     for n in names))


class PacedBackend(ScriptedBackend):
    """A scripted API that takes a pacing turn before each upstream call, as the provider modules do."""

    pace = None

    async def generate(self, job, deadline):
        if self.pace is not None:
            await self.pace(deadline)
        return await super().generate(job, deadline)


def guarded(backend: PacedBackend, **kw) -> BackendGuard:
    guard = BackendGuard(backend.offer.name, **kw)
    backend.pace = guard.pacer.acquire
    return guard


def test_the_window_allows_at_most_the_limit_in_any_60_s_from_the_first_call():
    now = [0.0]
    window = RateWindow(10, clock=lambda: now[0])
    sent = []
    for step in range(400):  # a call offered every 0.5 s for 200 s
        now[0] = step * 0.5
        if window.take() == 0:
            sent.append(now[0])
    assert all(sum(1 for t in sent if start <= t < start + 60) <= 10 for start in sent)
    assert sum(1 for t in sent if t < 60) == 10  # no full bucket to burst from at start: 10 in the first minute
    assert window.wait_s() > 0 and window.take() > 0  # and it says how long until a turn frees


async def test_a_429_paces_the_backend_and_the_requests_own_retry_goes_through_after_retry_after():
    a = PacedBackend("a", fail=lambda j: BackendRateLimited("429", retry_after_s=0.2) if len(a.calls) == 1 else None)
    guard = guarded(a)
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"a": a}, guards={"a": guard}).run(decision("a"), JOB, time.monotonic() + 5, attempts)
    assert out.candidate.backend == "a" and [x.outcome for x in attempts] == ["error", "ok"]
    assert time.monotonic() - started >= 0.2  # the provider's Retry-After was honoured
    assert guard.ejector.state == "serving"  # slow down is not broken


async def test_many_429s_never_eject_and_a_paced_backend_sends_calls_elsewhere_without_calling_it():
    a = PacedBackend("a", fail=lambda j: BackendRateLimited("429", retry_after_s=30))
    b = PacedBackend("b")
    guard = guarded(a)
    dispatcher = Dispatcher({"a": a, "b": b}, guards={"a": guard, "b": guarded(b)})
    for i in range(20):
        out = await dispatcher.run(decision("a", "b"), dataclasses.replace(JOB, id=f"r{i}"),
                                   time.monotonic() + 5, [])
        assert out.candidate.backend == "b"
    assert guard.ejector.state == "serving" and guard.health()[0].value == "ok"
    assert len(a.calls) == 1  # after the first 429 the pause held every later call back, nothing sent
    assert guard.pacer.wait_s() > 25 and "Retry-After 30" in guard.status()["pacing"]["reason"]


async def test_a_paced_attempt_is_audited_as_paced_and_falls_back_at_once():
    a, b = PacedBackend("a"), PacedBackend("b")
    guard = guarded(a, requests_per_minute=1)
    dispatcher = Dispatcher({"a": a, "b": b}, guards={"a": guard})
    await dispatcher.run(decision("a", "b"), JOB, time.monotonic() + 5, [])  # takes the minute's only turn
    attempts = []
    started = time.monotonic()
    out = await dispatcher.run(decision("a", "b"), dataclasses.replace(JOB, id="r2"), time.monotonic() + 5, attempts)
    assert out.candidate.backend == "b" and time.monotonic() - started < 0.5
    assert [(x.backend, x.outcome) for x in attempts] == [("a", "paced"), ("b", "ok")]
    assert len(a.calls) == 1


async def test_a_short_wait_for_a_turn_is_waited_when_the_deadline_allows():
    now = [0.0]
    slept = []

    async def sleep(s):
        slept.append(s)
        now[0] += s

    pacer = Pacer("a", per_minute=2, clock=lambda: now[0], sleep=sleep)
    await pacer.acquire(100)
    await pacer.acquire(100)
    await pacer.acquire(100)  # the window is full: waits until the first call leaves it
    assert slept == [pytest.approx(60.0)] and pacer.calls == 3


@respx.mock
async def test_every_upstream_call_takes_a_turn_each_of_n_each_submit_and_each_poll():
    base = "https://bria.test"
    submits = respx.post(f"{base}/v2/image/generate").respond(202, json={"request_id": "r1"})
    polls = respx.get(f"{base}/v2/status/r1").mock(side_effect=[
        respx.MockResponse(200, json={"status": "IN_PROGRESS"}),
        *[respx.MockResponse(200, json={"status": "COMPLETED", "result": {"image_url": f"{base}/i.png"}})] * 4])
    respx.get(f"{base}/i.png").respond(200, content=b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    bria = BriaBackend(ProviderConfig(name="bria", base_url=base, api_key=SecretStr("k"), model="fibo",
                                      transport="httpx", options={"poll_initial_s": 0.01, "poll_max_s": 0.01}))
    pacer = Pacer("bria", per_minute=60)
    bria.pace = pacer.acquire
    await bria.generate(dataclasses.replace(JOB, n=2), time.monotonic() + 5)
    assert pacer.calls == submits.call_count + polls.call_count == 2 + 3
    assert len(pacer.window._calls) == 5


async def test_replicas_share_one_window_and_each_keeps_to_its_share_while_the_store_is_away():
    answers = iter([0.0, 12.5, None, None, None, None])

    async def shared(backend, per_minute):
        return next(answers)

    now = [0.0]
    pacer = Pacer("a", per_minute=6, clock=lambda: now[0])
    pacer.shared_take, pacer.local_share = shared, lambda: 1 / 3
    await pacer.acquire(100)  # the shared window gave a turn
    with pytest.raises(BackendRateLimited):
        await pacer.acquire(5)  # the shared window is full for 12.5 s: too late for this deadline
    assert pacer.wait_s() == pytest.approx(12.5)
    now[0] = 13
    await pacer.acquire(100)
    await pacer.acquire(100)  # the store is away: this replica's third of 6 per minute, locally
    with pytest.raises(BackendRateLimited):
        await pacer.acquire(20)
