"""A hung provider cannot use the whole SLA; equal candidates share traffic; a slow one gets less."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

from backends.errors import BackendTransientError
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.guard import BackendGuard
from policies import decide
from policies.schema import Dispatch, Policy
from policies.types import (
    BackendKind,
    BackendView,
    Candidate,
    Decision,
    Health,
    LatencyModel,
    RouteRequest,
    SizeSupport,
    Snapshot,
)
from tests.fakes import ScriptedBackend

JOB = GenerationJob(id="j1", prompt="p", width=64, height=64)


def decision(*cands: tuple[str, float, float], sla_ms=2000, max_cost=None) -> Decision:
    """cands: (name, predicted p95 ms, p99 ms)."""
    return Decision(policy_version="v", tier="standard", sla_ms=sla_ms, max_cost_usd=max_cost, objective="min_cost",
                    rule=None, rejected=(), reason="test",
                    candidates=tuple(Candidate(n, "m1", p95, 0.01, 0.8, 4, p99_ms=p99) for n, p95, p99 in cands))


async def test_a_hung_first_attempt_leaves_the_next_candidate_its_predicted_latency_before_the_deadline():
    hung, good = ScriptedBackend("hung", delay_s=60), ScriptedBackend("good", delay_s=0.1)
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"hung": hung, "good": good}).run(
        decision(("hung", 200, 2000), ("good", 500, 600)), JOB, started + 2.0, attempts, Dispatch(hedge_at_p99=False))
    took = time.monotonic() - started
    assert out.candidate.backend == "good" and took < 2.0  # within the SLA, not a 504 at the deadline
    assert attempts[0].outcome == "timeout" and 1.3 < attempts[0].latency_ms / 1000 < 1.7  # cut at 2.0 - 0.5 s


async def test_a_probe_of_a_never_measured_shape_is_bounded_so_the_next_candidate_still_makes_the_sla():
    pool, api = ScriptedBackend("local", delay_s=60), ScriptedBackend("reve", delay_s=0.1)
    probe = Candidate("local", "sdxl", 5_000, 0.0, 0.6, 30, probe=True)  # no p99: a queueing backend
    d = dataclasses.replace(decision(("reve", 500, 600)), candidates=(probe, *decision(("reve", 500, 600)).candidates))
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"local": pool, "reve": api}).run(d, JOB, started + 2.0, attempts,
                                                            Dispatch(hedge_at_p99=False))
    assert out.candidate.backend == "reve" and time.monotonic() - started < 2.0
    assert attempts[0].backend == "local" and 1.3 < attempts[0].latency_ms / 1000 < 1.7  # cut at 2.0 - 0.5 s


async def test_a_call_with_no_answer_by_its_p99_starts_the_next_candidate_and_the_loser_is_cancelled():
    slow, fast = ScriptedBackend("slow", delay_s=5), ScriptedBackend("fast", delay_s=0.05)
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"slow": slow, "fast": fast}).run(
        decision(("slow", 100, 300), ("fast", 500, 600), sla_ms=10_000), JOB, started + 10, attempts)
    assert out.candidate.backend == "fast" and time.monotonic() - started < 1.0
    assert {(a.backend, a.outcome, a.hedge) for a in attempts} == {("slow", "cancelled", False), ("fast", "ok", True)}
    assert attempts[1].started_ms >= 300  # started at the first one's p99, not before
    assert out.hedge_cost_usd > 0  # the cancelled call may still be billed: counted


async def test_no_p99_hedge_when_the_cost_ceiling_cannot_pay_for_both_or_the_policy_turns_it_off():
    for dispatch, max_cost in ((Dispatch(), 0.015), (Dispatch(hedge_at_p99=False), None)):
        slow, fast = ScriptedBackend("slow", delay_s=0.5), ScriptedBackend("fast")
        out = await Dispatcher({"slow": slow, "fast": fast}).run(
            decision(("slow", 100, 200), ("fast", 100, 200), sla_ms=10_000, max_cost=max_cost), JOB,
            time.monotonic() + 10, [], dispatch)
        assert out.candidate.backend == "slow" and not fast.calls


def api(name: str, p50_ms: float, inflight: int = 0) -> BackendView:
    return BackendView(name=name, kind=BackendKind.API, health=Health.OK, models=(f"{name}-m",),
                       sizes=SizeSupport(), max_n=10, default_steps=30,
                       latency=LatencyModel(p50_ms=p50_ms, p95_ms=p50_ms * 2), inflight=inflight)


TWINS = Policy.model_validate({"defaults": {"tier": "standard", "sla_ms": 60_000},
                               "tiers": {"standard": {"min_quality": 0.5}},
                               "backends": {"east": {"quality": 0.8, "price_per_image_usd": 0.01},
                                            "west": {"quality": 0.8, "price_per_image_usd": 0.01}}})


def test_equal_price_and_quality_candidates_are_ranked_by_expected_completion_under_load():
    req = RouteRequest(width=1024, height=1024)
    assert decide(req, TWINS, Snapshot((api("east", 1000, 2), api("west", 1000, 0)))).chosen.backend == "west"
    assert decide(req, TWINS, Snapshot((api("east", 1000, 0), api("west", 1000, 1)))).chosen.backend == "east"
    # a slower twin is chosen only once the faster has enough in flight
    assert decide(req, TWINS, Snapshot((api("east", 500, 1), api("west", 1500, 0)))).chosen.backend == "east"
    assert decide(req, TWINS, Snapshot((api("east", 500, 3), api("west", 1500, 0)))).chosen.backend == "west"


async def test_two_equal_deployments_share_the_traffic_and_a_slow_one_gets_less():
    from gateway.snapshot import SnapshotSource

    async def share(east_s: float, west_s: float) -> Counter:
        backends = {"east": ScriptedBackend("east", delay_s=east_s), "west": ScriptedBackend("west", delay_s=west_s)}
        guards = {n: BackendGuard(n) for n in backends}
        snapshots, dispatcher = SnapshotSource(backends, guards), Dispatcher(backends, guards)
        # latency as observed: the snapshot's priors say how fast each is
        raw = TWINS.model_dump(mode="json")
        for n, s in (("east", east_s), ("west", west_s)):
            raw["backends"][n]["latency_prior"] = {"p50_ms": s * 1000, "p95_ms": s * 2000}
        policy = Policy.model_validate(raw)
        served = Counter()

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.005)
            d = decide(RouteRequest(width=64, height=64), policy, snapshots.current(policy))
            out = await dispatcher.run(d, dataclasses.replace(JOB, id=f"r{i}"), time.monotonic() + 30, [])
            served[out.candidate.backend] += 1

        await asyncio.gather(*(one(i) for i in range(80)))
        return served

    equal = await share(0.1, 0.1)
    assert 30 <= equal["east"] <= 50  # about half each (a name tie-break gave 100/0)
    skewed = await share(0.05, 0.2)
    assert skewed["east"] > skewed["west"] > 0


async def test_the_last_candidate_hedges_on_itself_past_its_p99_so_one_hung_call_does_not_fail_the_request():
    calls = []

    class HangsOnce(ScriptedBackend):
        async def generate(self, job, deadline):
            calls.append(job)
            if len(calls) == 1:
                await asyncio.sleep(60)
            return await super().generate(job, deadline)

    only = HangsOnce("only")
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"only": only}).run(decision(("only", 100, 300), sla_ms=5000), JOB, started + 5, attempts)
    assert out.candidate.backend == "only" and time.monotonic() - started < 1.0
    assert [(a.outcome, a.hedge) for a in attempts] == [("cancelled", False), ("ok", True)]


async def test_the_last_candidate_keeps_trying_within_the_deadline():
    fails = iter([BackendTransientError("500")] * 3)
    only = ScriptedBackend("only", fail=lambda j: next(fails, None))
    attempts = []
    out = await Dispatcher({"only": only}).run(decision(("only", 100, 300), sla_ms=5000), JOB,
                                               time.monotonic() + 5, attempts,
                                               Dispatch(backoff_initial_ms=1, backoff_max_ms=2, hedge_at_p99=False))
    assert out.candidate.backend == "only" and [a.outcome for a in attempts] == ["error"] * 3 + ["ok"]
