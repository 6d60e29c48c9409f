"""The policy simulator: deterministic, conserving, and routing with the real decide()."""

from __future__ import annotations

import pytest
import yaml

from policies.profile import ThroughputProfile
from policies.schema import Policy
from policies.simulate import ApiModel, PoolSpec, Strategy, World, simulate, with_rule
from policies.traces import KINDS, TraceRequest, dump_jsonl, parse_jsonl, synthetic
from tests.conftest import ROOT

POLICY = Policy.model_validate(yaml.safe_load((ROOT / "config" / "policy.yaml").read_text()))
WORLD = World((ApiModel("reve", 6000, 15000, 0.05), ApiModel("seedream", 8000, 20000, 0.02),
               ApiModel("gemini", 12000, 30000), ApiModel("bria", 10000, 25000)),
              PoolSpec(ThroughputProfile({("sdxl", 1024, 1024, 30): {1: 1.15, 8: 7.8}}), "sdxl", gpus=1))


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_traces_are_deterministic_and_round_trip_as_json_lines(kind):
    a, b = synthetic(kind, 600, 0.5, seed=3), synthetic(kind, 600, 0.5, seed=3)
    assert a == b and a != synthetic(kind, 600, 0.5, seed=4)
    assert parse_jsonl(dump_jsonl(a).splitlines()) == a


def test_a_trace_request_is_held_to_what_a_request_may_say_and_a_bad_one_names_its_field_and_line():
    for bad, named in (({"t": "x"}, "t:"), ({"t": float("nan")}, "t:"), ({"t": 0, "width": -5}, "width:"),
                       ({"t": 0, "n": 11}, "n:"), ({"t": 0, "sla_ms": True}, "sla_ms:"),
                       ({"t": 0, "steps": 0}, "steps:"), ({"t": 0, "job": "yes"}, "job:"),
                       ({"t": 0, "tenant": ""}, "tenant:")):
        with pytest.raises(ValueError, match=named):
            TraceRequest(**bad)
    with pytest.raises(ValueError, match="trace line 2: width"):
        parse_jsonl(['{"t": 0}', '{"t": 1, "width": 10}'])
    with pytest.raises(ValueError, match="trace line 1: a JSON object"):
        parse_jsonl(["[1, 2]"])


def test_a_replay_of_the_audit_leaves_out_requests_refused_at_the_door():
    from gateway.simulation import trace_from_audit

    served = {"ts": 10.0, "status": 200, "decision": {"tier": "standard"}, "request": {"size": "1024x1024", "n": 1}}
    invalid = {"ts": 11.0, "status": 400, "decision": None, "request": {"size": "16x16", "n": 1, "tier": "nope"}}
    refused = {"ts": 12.0, "status": 503, "decision": {"tier": "standard"}, "request": {"size": "512x512", "n": 2}}
    trace = trace_from_audit([served, invalid, refused])
    assert [(r.t, r.width, r.n) for r in trace] == [(0.0, 1024, 1), (2.0, 512, 2)]  # a routed refusal stays


def test_every_arrival_shape_comes_with_every_mix_of_tiers_and_sizes():
    from policies.traces import MIXED_SHAPES

    tight = synthetic("steady_tight", 600, 1.0, seed=1)
    assert {r.sla_ms for r in tight} == {5_000, 20_000, 30_000, 60_000} and max(r.n for r in tight) == 2
    mixed = synthetic("bursty_mixed", 600, 1.0, seed=1)
    assert {(r.width, r.height) for r in mixed} == {(w, h) for w, h, _ in MIXED_SHAPES}
    assert max(r.n for r in mixed) == 4 and {r.steps for r in mixed} == {20, 30}


def test_same_seed_same_result():
    trace = synthetic("bursty", 900, 1.0, seed=1)
    assert simulate(trace, POLICY, WORLD, seed=7).summary() == simulate(trace, POLICY, WORLD, seed=7).summary()


def test_every_request_is_served_or_refused_exactly_once():
    trace = synthetic("flash_crowd", 900, 1.5, seed=2)
    result = simulate(trace, POLICY, WORLD, seed=1)
    assert [o.request for o in result.outcomes] == trace
    s = result.summary()
    assert s["served"] + s["refused_or_failed"] == len(trace)
    assert sum(s["backend_mix"].values()) == len(trace)
    assert s["images"] == sum(o.request.n for o in result.outcomes if o.done_at is not None)
    api = sum(o.cost_usd for o in result.outcomes if o.backend not in (None, "local"))
    assert s["api_spend_usd"] == pytest.approx(api, abs=1e-3)


def test_routing_follows_the_policy():
    trace = [TraceRequest(t=i * 10.0, tier="standard", sla_ms=30_000) for i in range(5)] + \
            [TraceRequest(t=100 + i * 10.0, tier="premium", sla_ms=60_000) for i in range(5)]
    mix = simulate(trace, POLICY, WORLD).summary()["backend_mix"]
    assert mix["local"] == 5  # idle pool, cheapest, meets the SLA
    assert "local" not in {o.backend for o in simulate(trace, POLICY, WORLD).outcomes[5:]}  # premium quality
    denied = Strategy("no local", with_rule(POLICY, {"name": "x", "deny": ["local"]}))
    assert "local" not in simulate(trace, denied, WORLD).summary()["backend_mix"]


def test_an_overloaded_pool_overflows_to_apis_instead_of_missing_slas():
    trace = synthetic("steady", 600, 3.0, seed=5)  # about three times one GPU's capacity
    ours = simulate(trace, POLICY, WORLD).summary()
    blind = simulate(trace, Strategy("blind", with_rule(POLICY, {"name": "b", "sla_ms": 10**9}), queue_blind=True),
                     WORLD).summary()
    assert ours["sla_attainment"] > 0.95 > blind["sla_attainment"]
    assert ours["gpu_utilisation"] > 0.8
    timeline = simulate(trace, POLICY, WORLD).timeline  # per minute: requests, spend, SLA, mix, GPU use
    assert len(timeline) == 10 and all(0 <= row["gpu_utilisation"] <= 1 for row in timeline)
    assert sum(row["requests"] for row in timeline) == len(trace)


def test_simulate_command_prints_both_policies_side_by_side_and_writes_a_report(settings, tmp_path, capsys,
                                                                                monkeypatch):
    from gateway.cli import main

    monkeypatch.setenv("IMAGEGW_DATA_DIR", str(settings.data_dir))
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text((ROOT / "config" / "policy.yaml").read_text().replace("objective: min_cost ",
                                                                                "objective: min_latency "))
    trace = tmp_path / "trace.jsonl"
    trace.write_text(dump_jsonl(synthetic("bursty", 300, 0.5, seed=1)))
    report = tmp_path / "report.html"
    assert main(["policy", "simulate", str(candidate), "--config", str(ROOT / "config"), "--trace", str(trace),
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "current" in out and "candidate" in out and "cost per image $" in out and "SLA standard" in out
    assert "<h1>" in report.read_text()


def test_admin_simulate_endpoint_returns_both_summaries(settings, shipped_policy, serve, monkeypatch):
    import httpx

    monkeypatch.setenv("IMAGEGW_ADMIN_KEY", "adm")
    from policies.types import BackendKind
    from tests.fakes import ScriptedBackend

    server = serve(settings, shipped_policy, {"local": ScriptedBackend("local", kind=BackendKind.LOCAL)})
    body = {"policy": (ROOT / "config" / "policy.yaml").read_text(),
            "trace": {"synthetic": "steady", "duration_s": 300, "rate_per_s": 0.5}}
    r = httpx.post(server.base_url + "/admin/policy/simulate", json=body, headers={"authorization": "Bearer adm"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["current"]["requests"] == r.json()["candidate"]["requests"] == r.json()["requests"]
    bad = httpx.post(server.base_url + "/admin/policy/simulate", json={"trace": {"nope": 1}},
                     headers={"authorization": "Bearer adm"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "trace"


def test_a_small_trace_gives_the_same_mix_and_cost_in_the_simulator_and_the_live_gateway(settings, serve, tmp_path):
    """Tolerance: the same backend mix, and API spend within 1%."""
    import asyncio

    import httpx

    from backends.sandbox import SandboxConfig
    from gateway.settings import WarmShapeSettings
    from gateway.simulation import build_world

    fast = {"latency_p50_ms": 50, "latency_p95_ms": 150}
    faults = tmp_path / "sandbox.json"
    faults.write_text(SandboxConfig.model_validate({p: fast for p in ("seedream", "gemini", "reve", "bria")})
                      .model_dump_json())
    settings.sandbox.mode, settings.sandbox.config_file = "on", faults
    settings.local.warm_shapes = [WarmShapeSettings(width=64, height=64, steps=2)]
    policy = Policy.model_validate({**POLICY.model_dump(mode="json"), "rules": []})
    trace = [TraceRequest(t=i * 0.2, tier="premium" if i % 3 == 0 else "standard", sla_ms=30_000,
                          width=64, height=64, steps=2, n=1 + (i % 4 == 0)) for i in range(18)]
    server = serve(settings, policy)

    async def replay():
        started = asyncio.get_running_loop().time()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            async def one(r):
                await asyncio.sleep(max(0.0, started + r.t - asyncio.get_running_loop().time()))
                return await client.post("/v1/images/generations", json={
                    "prompt": "p", "size": f"{r.width}x{r.height}", "n": r.n, "tier": r.tier, "sla_ms": r.sla_ms,
                    "steps": r.steps})
            return await asyncio.gather(*(one(r) for r in trace))

    live = asyncio.run(replay())
    assert all(r.status_code == 200 for r in live)
    live_mix = {}
    for r in live:
        live_mix[r.headers["x-gateway-backend"]] = live_mix.get(r.headers["x-gateway-backend"], 0) + 1
    live_api_spend = sum(float(r.headers["x-gateway-cost-usd"]) for r in live
                         if r.headers["x-gateway-backend"] != "local")
    sim = simulate(trace, policy, build_world(settings, policy)).summary()
    assert sim["backend_mix"] == live_mix
    assert sim["api_spend_usd"] == pytest.approx(live_api_spend, rel=0.01)


def _economics():
    import importlib.util

    spec = importlib.util.spec_from_file_location("routing_economics", ROOT / "benchmarks" / "routing_economics.py")
    economics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(economics)
    return economics, Policy.model_validate(yaml.safe_load((ROOT / "config" / "policy.yaml").read_text()))


def test_the_lower_bound_counts_a_burst_the_pool_cannot_absorb_before_its_deadlines():
    economics, policy = _economics()
    world = economics.world(1)
    # 100 standard images (30 s SLA) in the first second, then quiet until t = 1000 s.
    trace = [TraceRequest(t=i / 100, tier="standard", sla_ms=30_000) for i in range(100)]
    trace.append(TraceRequest(t=1000.0, tier="standard", sla_ms=30_000))
    per_image = world.pool.profile.seconds_per_image("sdxl", 1024, 1024, 30, 8)
    gpu_usd = 1000 / 3600 * world.pool.gpu_hour_usd
    # They can use the GPU from t = 0 until 5 s (their arrival bucket) + 30 s at best; the rest must go to
    # the cheapest eligible API (reve, $0.024).
    expected_overflow = (100 * per_image - 35.0) / per_image
    assert economics.lower_bound(trace, policy, world) == pytest.approx(gpu_usd + expected_overflow * 0.024)
    # The plain capacity bound (one window over the whole trace) sees 1000 GPU-seconds: no overflow.
    assert economics.lower_bound(trace, policy, world, step_s=10_000) == pytest.approx(gpu_usd)


@pytest.mark.parametrize("kind", ["steady", "bursty", "flash_crowd"])
def test_the_lower_bound_is_below_what_every_strategy_meeting_all_slas_pays(kind):
    economics, policy = _economics()
    world = economics.world(1)
    trace = synthetic(kind, 900, 1.0, seed=3)
    bound = economics.lower_bound(trace, policy, world)
    assert bound >= economics.lower_bound(trace, policy, world, step_s=10_000) > 0
    for strategy in economics.strategies(policy):
        result = simulate(trace, strategy, world, seed=3).summary()
        if result["sla_attainment"] == 1.0 or strategy.name == "cheapest API only":  # the latter pays >= by design
            assert result["total_cost_usd"] >= bound - 1e-6, strategy.name


def _drafts_at_30_steps(policy: Policy) -> Policy:
    data = policy.model_dump(mode="json")
    data["tiers"]["draft"].update(steps=None, max_steps=None)
    return Policy.model_validate(data)


def test_late_binding_keeps_the_pool_for_the_tier_no_api_serves_reliably():
    # Drafts (15 s) have no API that reliably makes 15 s; standard (30 s) has. In bursts the pool gives back
    # tentative standard jobs so drafts can have it, instead of binding whoever came first at arrival.
    import dataclasses

    two_gpus = dataclasses.replace(WORLD, pool=dataclasses.replace(WORLD.pool, gpus=2))
    trace = synthetic("bursty", 1800, 1.5, seed=1)
    policy = _drafts_at_30_steps(POLICY).model_copy(update={"reserve_pool": False})  # late binding alone
    late = simulate(trace, policy, two_gpus).summary()
    early = simulate(trace, Strategy("at arrival", policy, late_binding=False), two_gpus).summary()
    assert late["pool_released"] > 0 == early["pool_released"]
    assert late["sla_by_tier"]["draft"] > early["sla_by_tier"]["draft"]
    assert late["sla_attainment"] > early["sla_attainment"]


def test_hedging_is_simulated_as_the_dispatcher_does_it_a_shorter_tail_for_a_higher_bill():
    trace = [TraceRequest(t=i * 2.0, tier="premium", sla_ms=60_000) for i in range(300)]  # APIs only
    hedged_policy = Policy.model_validate({**POLICY.model_dump(mode="json"),
                                           "dispatch": {**POLICY.dispatch.model_dump(mode="json"), "hedge": True}})
    plain = simulate(trace, POLICY, WORLD, seed=3)
    hedged = simulate(trace, hedged_policy, WORLD, seed=3)
    p, h = plain.summary(), hedged.summary()
    # reve first; seedream starts once reve passes its predicted p95 (15 s): the slowest answers come sooner
    assert max(o.latency_s for o in hedged.outcomes) < max(o.latency_s for o in plain.outcomes) - 5
    assert h["api_spend_usd"] > p["api_spend_usd"]
    assert h["served"] == p["served"] == 300
    assert h["hedges_started"] > 0 == p["hedges_started"]
    # the loser of a race is charged (a cancelled call may still be billed), and only once
    assert hedged.api_spend_usd == pytest.approx(sum(o.cost_usd for o in hedged.outcomes))
    assert len(set(h["backend_mix"])) > 1


def test_a_lone_job_launches_at_once_in_the_simulator_as_in_the_pool_when_no_company_is_coming():
    import dataclasses

    waiting = dataclasses.replace(WORLD, pool=dataclasses.replace(WORLD.pool, max_wait_s=2.0))
    sparse = [TraceRequest(t=i * 30.0, tier="standard", sla_ms=30_000) for i in range(4)]
    outcomes = [o for o in simulate(sparse, POLICY, waiting).outcomes if o.backend == "local"]
    assert len(outcomes) == 4
    # 1.15 s of GPU time each, never the 2 s max_wait before it (one arrival every 30 s brings no company)
    assert max(o.latency_s for o in outcomes) < 1.15 + 0.5
    dense = [TraceRequest(t=i * 0.5, tier="standard", sla_ms=30_000) for i in range(6)]
    together = {o.done_at for o in simulate(dense, POLICY, waiting).outcomes if o.backend == "local"}
    assert len(together) < 6  # company is coming: jobs wait and share batches


def test_async_jobs_wait_for_the_idle_pool_meet_their_hours_long_slas_and_never_delay_interactive_work():
    from policies.schema import JobsPolicy

    # A busy hour of interactive work (about twice one GPU), then a quiet one; async jobs (SLA 2 h) arrive during
    # the busy hour.
    busy = synthetic("steady", 3600, 2.0, seed=11)
    jobs = [TraceRequest(t=30.0 * i, tier="standard", sla_ms=7_200_000, job=True) for i in range(100)]
    trace = sorted(busy + jobs, key=lambda r: r.t)
    trace.append(TraceRequest(t=7000.0, tier="standard", sla_ms=30_000))  # the horizon reaches the quiet hour
    held = simulate(trace, POLICY, WORLD, seed=2)
    eager = simulate(trace, Strategy("queued in the pool at once", POLICY.model_copy(
        update={"jobs": JobsPolicy(hold_for_idle_pool=False)})), WORLD, seed=2)
    h, e = held.summary(), eager.summary()
    assert h["jobs_held"] > 0 and e["jobs_held"] == 0
    job_outcomes = [o for o in held.outcomes if o.request.job]
    assert all(o.sla_met and o.backend == "local" for o in job_outcomes)  # all on the pool, none late
    assert max(o.done_at for o in job_outcomes) > 3600  # most waited for the quiet hour
    interactive = [o for o in held.outcomes if not o.request.job]
    assert sum(o.sla_met for o in interactive) / len(interactive) >= 0.95
    # Queued in the pool at once, they cost the same here: the pool's queue is earliest-deadline-first, so jobs
    # never delay interactive work there either. Holding keeps them in the job store instead (the pool's queue
    # and the runner's slots stay for work that is due).
    assert h["api_spend_usd"] <= e["api_spend_usd"]


def test_reserving_the_pool_for_tight_drafts_meets_more_of_them_for_little_more_per_image():
    economics, policy = _economics()
    policy = _drafts_at_30_steps(policy)  # the reservation alone (fewer steps for drafts is another lever,
    policy = policy.model_copy(update={"dispatch": policy.dispatch.model_copy(  # and so is hedging on it)
        update={"hedge_pressed_pool": False})})
    world = economics.world(2)
    trace = synthetic("tight_drafts", 1800, 0.6, seed=1)  # 5 s drafts no API meets, bursts of standard work
    plain = simulate(trace, policy.model_copy(update={"reserve_pool": False}), world, seed=1).summary()
    reserved = simulate(trace, policy, world, seed=1).summary()  # on by default
    assert reserved["sla_by_tier"]["draft"] > plain["sla_by_tier"]["draft"] + 0.05
    assert reserved["sla_attainment"] >= 0.99 > plain["sla_attainment"]
    # Short batches, not a backlog limit: little standard work leaves the pool, so each image in time costs
    # little more (the standard work a burst sends to an API, and the late drafts kept off a pressed pool; +20%
    # with the per-size profile measured on 2026-12-08, whose 20-step drafts take 9% more than 30 steps scaled
    # down; +13% on the linear profile before it, +9% before late drafts counted toward the pool's room).
    assert reserved["cost_per_sla_met_image_usd"] < 1.25 * plain["cost_per_sla_met_image_usd"]


def test_drafts_capped_at_fewer_steps_take_less_pool_time_and_meet_more_slas():
    economics, policy = _economics()
    world = economics.world(2)
    trace = synthetic("tight_drafts", 1800, 1.0, seed=1)
    at_30 = simulate(trace, _drafts_at_30_steps(policy), world, seed=1).summary()
    at_20 = simulate(trace, policy, world, seed=1).summary()  # the shipped draft tier: steps 20, max_steps 20
    assert at_20["sla_by_tier"]["draft"] > at_30["sla_by_tier"]["draft"] + 0.01
    assert at_20["cost_per_sla_met_image_usd"] < at_30["cost_per_sla_met_image_usd"]


def test_hedging_on_a_pressed_pool_buys_slas_in_bursts_of_pool_only_work_and_costs_nothing_elsewhere():
    economics, policy = _economics()
    world = economics.world(2)
    off = policy.model_copy(update={"dispatch": policy.dispatch.model_copy(update={"hedge_pressed_pool": False})})
    tight = synthetic("tight_drafts", 900, 2.0, seed=1)
    plain, hedged = (simulate(tight, p, world, seed=1).summary() for p in (off, policy))
    assert hedged["hedges_started"] > 0 and hedged["sla_attainment"] > plain["sla_attainment"] + 0.01
    steady = synthetic("steady", 900, 1.0, seed=1)  # no pool-only work pressing: never hedged, nothing paid
    calm = simulate(steady, policy, world, seed=1).summary()
    assert calm["hedges_started"] == 0
    assert calm["total_cost_usd"] == simulate(steady, off, world, seed=1).summary()["total_cost_usd"]


def test_a_pool_job_is_raced_only_when_the_pool_predicts_it_late_most_hedges_paid_for_images_it_delivered(
        monkeypatch):
    from policies import reservation

    economics, policy = _economics()
    world = economics.world(2)
    trace = synthetic("tight_drafts", 900, 1.0, seed=1)
    gated = simulate(trace, policy, world, seed=1).summary()
    monkeypatch.setattr(reservation, "HEDGE_MARGIN", 1e9)  # every pool job late: raced on elapsed time alone
    blind = simulate(trace, policy, world, seed=1).summary()
    assert gated["hedges_started"] < 0.7 * blind["hedges_started"]
    assert gated["total_cost_usd"] < 0.95 * blind["total_cost_usd"]
    assert gated["sla_attainment"] >= 0.99


def test_where_the_pool_is_short_the_work_that_saves_least_per_gpu_second_goes_elsewhere(monkeypatch):
    import math

    from policies import types

    economics, policy = _economics()
    world = economics.world(2)
    trace = synthetic("flash_crowd", 900, 1.0, seed=1)  # ten times the load for five minutes
    priced = simulate(trace, policy, world, seed=1).summary()
    monkeypatch.setattr(types, "DENSER", math.inf)  # no request worth more than another: the pool goes by arrival
    plain = simulate(trace, policy, world, seed=1).summary()
    # 20-step drafts save reve's $0.024 in 0.7 GPU-s, 30-step standard images in 1.0 s: in the crowd the pool keeps
    # the drafts and standard work goes to reve, which buys more SLA for less.
    assert priced["sla_attainment"] > plain["sla_attainment"] + 0.005
    assert priced["sla_attainment"] >= 0.99 > plain["sla_attainment"]
    assert priced["total_cost_usd"] < plain["total_cost_usd"]


def test_an_offline_plan_is_replayed_as_written_each_request_on_the_backends_it_names():
    sure = World(tuple(ApiModel(a.name, a.p50_ms, a.p95_ms) for a in WORLD.apis), WORLD.pool)  # no failures
    trace = [TraceRequest(t=i * 20.0, tier="standard", sla_ms=30_000, n=2) for i in range(4)]
    planned = [("local",), ("seedream",), ("reve", "seedream"), ()]
    result = simulate(trace, Strategy("plan", POLICY, plan=planned), sure, seed=1)
    local, one, both, refused = result.outcomes
    price = {name: POLICY.backends[name].price_per_image(1.048576, None, None) * 2 for name in ("reve", "seedream")}
    assert local.backend == "local" and local.cost_usd < 0.01
    assert one.backend == "seedream" and one.cost_usd == pytest.approx(price["seedream"])
    assert both.backend in ("reve", "seedream") and both.cost_usd == pytest.approx(sum(price.values()))  # both paid
    assert refused.backend is None and refused.attempts == 0
    assert result.summary()["api_spend_usd"] == pytest.approx(one.cost_usd + both.cost_usd, abs=1e-4)
    with pytest.raises(ValueError, match="3 choices for a trace of 4 requests"):
        simulate(trace, Strategy("plan", POLICY, plan=planned[:3]), sure)


def test_a_planned_pool_job_that_falls_behind_is_given_back_only_when_the_replay_allows_a_fallback():
    data = POLICY.model_dump(mode="json")
    data["tiers"]["standard"]["on_no_candidate"] = "best_effort"  # predicted late, still sent where planned
    policy = Policy.model_validate(data)
    burst = [TraceRequest(t=0.0, tier="standard", sla_ms=30_000, n=8) for _ in range(6)]  # ~47 s of one GPU
    pinned = simulate(burst, Strategy("plan", policy, plan=[("local",)] * 6), WORLD, seed=1).summary()
    assert pinned["backend_mix"] == {"local": 6} and pinned["sla_attainment"] < 0.7
    rescued = simulate(burst, Strategy("plan", policy, plan=[("local",)] * 6, plan_fallback=True), WORLD,
                       seed=1).summary()
    assert rescued["pool_released"] >= 2 and rescued["backend_mix"]["local"] <= 4
    assert rescued["sla_attainment"] > pinned["sla_attainment"]


def test_a_pool_that_pre_empts_at_a_step_meets_both_and_the_paused_batch_ends_later_by_the_drafts_run():
    """The same pair on one GPU whose pool-only work pauses flexible work (PoolSpec.preemptive): the draft runs
    after the running batch's current step, and the batch ends later by the draft's run."""
    import dataclasses
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import routing_economics as economics  # the benchmarks' world: SDXL on an H100, the four APIs

    world = economics.world(1)
    preemptive = World(world.apis, dataclasses.replace(world.pool, preemptive=True))
    trace = [TraceRequest(t=0.0, tier="standard", sla_ms=20_000, n=8), TraceRequest(t=0.5, tier="draft", sla_ms=5_000)]
    result = simulate(trace, POLICY, preemptive, seed=1)
    standard, draft = result.outcomes
    assert result.preempted == 1 and standard.backend == draft.backend == "local"
    assert standard.sla_met and draft.sla_met
    profile = world.pool.profile
    batch_s, draft_s = profile.seconds("sdxl", 1024, 1024, 30, 8), profile.seconds("sdxl", 1024, 1024, 20, 1)
    assert draft.done_at == pytest.approx(0.5 + batch_s / 30 + draft_s, abs=0.01)  # after the batch's step
    assert standard.done_at == pytest.approx(batch_s + draft_s, abs=0.11)  # (its own start waits <= 0.1 s)
    assert simulate(trace, POLICY, world, seed=1).summary()["sla_by_tier"]["draft"] == 0.0  # without: too late
