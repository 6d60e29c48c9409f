"""decide() as a specification: plain data in, a ranked Decision with reasons out."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from policies import decide
from policies.profile import ThroughputProfile
from policies.schema import Policy
from policies.types import (
    BackendKind,
    BackendView,
    Health,
    LatencyModel,
    PoolModel,
    QueuePoint,
    RejectReason,
    RouteRequest,
    SizeSupport,
    Snapshot,
)


def api(name, p95_ms=10_000.0, **kw) -> BackendView:
    return BackendView(name=name, kind=BackendKind.API, health=kw.pop("health", Health.OK),
                       models=kw.pop("models", (f"{name}-v1",)), sizes=kw.pop("sizes", SizeSupport()),
                       max_n=kw.pop("max_n", 10), default_steps=30,
                       latency=LatencyModel(p50_ms=p95_ms / 2, p95_ms=p95_ms))


P95 = LatencyModel(1, 1).pool_p95_factor  # the pool's p95 over its mean queue prediction
# SDXL-like: 1024x1024, 30 steps: 1.0 s alone, 4.8 s for a batch of 8 (0.6 GPU-s per image).
PROFILE = ThroughputProfile({("sdxl", 1024, 1024, 30): {1: 1.0, 8: 4.8}})


def local(queue_ms=0.0, has_headroom=True, typical_batch=1.0, workers=1) -> BackendView:
    return BackendView(name="local", kind=BackendKind.LOCAL, health=Health.OK, models=("sdxl",),
                       sizes=SizeSupport(max_side=2048, multiple_of=8), max_n=10, default_steps=30,
                       latency=LatencyModel(p50_ms=50, p95_ms=100),
                       pool=PoolModel(PROFILE, "sdxl", gpu_hour_usd=2.0, workers=workers,
                                      work_ahead_s=queue_ms / 1000 * workers, typical_batch=typical_batch,
                                      has_headroom=has_headroom))


POLICY = Policy.model_validate({
    "defaults": {"tier": "standard", "sla_ms": 30_000},
    "tiers": {"draft": {"min_quality": 0.0}, "standard": {"min_quality": 0.5},
              "premium": {"min_quality": 0.9, "sla_ms": 60_000}},
    "backends": {
        "local": {"quality": 0.6},
        "reve": {"quality": 0.8, "price_per_image_usd": 0.024},
        "seedream": {"quality": 0.85, "price_per_image_usd": 0.035},
        "gemini": {"quality": 0.95, "price_per_image_usd": 0.134},
    },
    "rules": [
        {"name": "acme-no-gemini", "match": {"tenants": ["acme"]}, "deny": ["gemini"]},
        {"name": "fast-tag", "match": {"tags_any": ["interactive"]}, "objective": "min_latency"},
        {"name": "only-local-for-internal", "match": {"tenants": ["internal"]}, "allow": ["local"]},
    ],
})

WORLD = Snapshot((local(), api("reve", 15_000), api("seedream", 20_000), api("gemini", 31_000)))
REQ = RouteRequest(width=1024, height=1024)


def names(decision):
    return [c.backend for c in decision.candidates]


def reasons(decision):
    return {r.backend: r.reason for r in decision.rejected}


def test_min_cost_ranks_local_first_then_cheapest_api():
    d = decide(REQ, POLICY, WORLD)
    assert names(d) == ["local", "reve", "seedream"]
    assert d.chosen.backend == "local"
    assert d.objective == "min_cost"


def test_gemini_missed_the_sla_and_says_so():
    d = decide(REQ, POLICY, WORLD)
    assert reasons(d)["gemini"] is RejectReason.SLA_MISS
    assert "SLA 30000 ms" in next(r.detail for r in d.rejected if r.backend == "gemini")


SCENARIOS = [
    # (description, request changes, snapshot, expected order, expected rejections)
    ("premium tier filters by quality", dict(tier="premium"), WORLD,
     ["gemini"], {"local": RejectReason.QUALITY_BELOW_TIER, "reve": RejectReason.QUALITY_BELOW_TIER,
                  "seedream": RejectReason.QUALITY_BELOW_TIER}),
    ("tenant rule denies a backend", dict(tenant="acme", sla_ms=60_000), WORLD,
     ["local", "reve", "seedream"], {"gemini": RejectReason.RULE_DENY}),
    ("allow-list rule keeps only local", dict(tenant="internal"), WORLD,
     ["local"], {"reve": RejectReason.RULE_DENY, "seedream": RejectReason.RULE_DENY,
                 "gemini": RejectReason.RULE_DENY}),
    ("a tight SLA drops slow APIs", dict(sla_ms=16_000), WORLD,
     ["local", "reve"], {"seedream": RejectReason.SLA_MISS, "gemini": RejectReason.SLA_MISS}),
    ("a queued pool misses the SLA", dict(sla_ms=16_000), Snapshot((local(queue_ms=20_000), api("reve", 15_000))),
     ["reve"], {"local": RejectReason.SLA_MISS}),
    ("cost ceiling drops the dearer APIs", dict(max_cost_usd=0.03, sla_ms=60_000), WORLD,
     ["local", "reve"], {"seedream": RejectReason.COST_CEILING, "gemini": RejectReason.COST_CEILING}),
    ("n multiplies API cost into the ceiling", dict(n=2, max_cost_usd=0.05), WORLD,
     ["local", "reve"], {"seedream": RejectReason.COST_CEILING, "gemini": RejectReason.SLA_MISS}),
    ("min_latency objective via a tag rule", dict(tags=frozenset({"interactive"}), sla_ms=60_000), WORLD,
     ["local", "reve", "seedream", "gemini"], {}),
    ("unsupported size is rejected", dict(width=4096, height=4096, sla_ms=600_000), WORLD,
     ["reve", "seedream", "gemini"], {"local": RejectReason.SIZE_UNSUPPORTED}),
    ("n above a backend's max", dict(n=3), Snapshot((local(), api("reve", 15_000, max_n=1))),
     ["local"], {"reve": RejectReason.N_UNSUPPORTED}),
    ("named backend excludes the others", dict(backend="seedream"), WORLD,
     ["seedream"], {"local": RejectReason.NOT_REQUESTED, "reve": RejectReason.NOT_REQUESTED,
                    "gemini": RejectReason.NOT_REQUESTED}),
    ("unhealthy and unconfigured backends are not candidates", {},
     Snapshot((local(), api("reve", health=Health.OPEN), api("seedream", health=Health.UNCONFIGURED))),
     ["local"], {"reve": RejectReason.UNHEALTHY, "seedream": RejectReason.UNCONFIGURED,
                 "gemini": RejectReason.UNCONFIGURED}),
    ("no candidate at all", dict(tier="premium", sla_ms=1_000), WORLD,
     [], {"gemini": RejectReason.SLA_MISS}),
]


@pytest.mark.parametrize(("changes", "snapshot", "order", "rejected"),
                         [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_scenario(changes, snapshot, order, rejected):
    d = decide(dataclasses.replace(REQ, **changes), POLICY, snapshot)
    assert names(d) == order
    got = reasons(d)
    for backend, reason in rejected.items():
        assert got[backend] is reason, (backend, got)
    # Every backend is either a candidate or rejected with a reason, never both, never lost.
    assert set(names(d)) | set(got) >= {v.name for v in snapshot.backends}
    assert not set(names(d)) & set(got)


def test_min_latency_orders_by_predicted_latency():
    d = decide(dataclasses.replace(REQ, tags=frozenset({"interactive"}), sla_ms=60_000), POLICY, WORLD)
    latencies = [c.predicted_latency_ms for c in d.candidates]
    assert latencies == sorted(latencies)
    assert d.rule == "fast-tag"


def test_local_cost_follows_gpu_time_at_the_occupancy_we_get_and_marginal_makes_it_free():
    alone = decide(REQ, POLICY, WORLD).candidates[0]
    assert alone.predicted_cost_usd == pytest.approx(2.0 / 3600 * 1.0)  # 1.0 GPU-s at batch 1, $2/h
    busy = decide(REQ, POLICY, Snapshot((local(typical_batch=8),))).candidates[0]
    assert busy.predicted_cost_usd == pytest.approx(2.0 / 3600 * 0.6)  # batching cuts the cost per image
    marginal = Policy.model_validate({**POLICY.model_dump(), "cost_accounting": "marginal"})
    assert decide(REQ, marginal, WORLD).candidates[0].predicted_cost_usd == 0.0
    saturated = Snapshot((local(has_headroom=False),))
    assert decide(REQ, marginal, saturated).candidates[0].predicted_cost_usd > 0


def test_same_inputs_same_decision():
    assert decide(REQ, POLICY, WORLD) == decide(REQ, POLICY, WORLD)


def test_decision_names_the_policy_version_and_reason():
    d = decide(REQ, POLICY, WORLD)
    assert d.policy_version == POLICY.fingerprint
    assert "local ranks first by min_cost" in d.reason


def test_disabled_backend_is_rejected():
    policy = Policy.model_validate({**POLICY.model_dump(), "backends": {
        **POLICY.model_dump()["backends"], "reve": {"quality": 0.8, "price_per_image_usd": 0.024, "enabled": False}}})
    assert reasons(decide(REQ, policy, WORLD))["reve"] is RejectReason.DISABLED


def test_backend_missing_from_policy_is_never_chosen():
    d = decide(REQ, POLICY, Snapshot((api("mystery", 1_000),)))
    assert names(d) == []
    assert reasons(d)["mystery"] is RejectReason.NOT_IN_POLICY


def test_local_latency_is_its_share_of_the_work_ahead_plus_its_own_batch():
    d = decide(REQ, POLICY, Snapshot((local(queue_ms=3_000, workers=2),)))
    # (3 s ahead per worker + 1.0 s own batch) x the p95 factor + 100 ms fixed p95
    assert d.candidates[0].predicted_latency_ms == pytest.approx((3_000 + 1_000) * P95 + 100)
    busy = decide(REQ, POLICY, Snapshot((local(queue_ms=3_000, workers=2, typical_batch=8),)))
    # a busy pool runs full batches: the new job's own batch is a batch of 8 (4.8 s)
    assert busy.candidates[0].predicted_latency_ms == pytest.approx((3_000 + 4_800) * P95 + 100)


def test_a_tight_sla_is_predicted_in_the_smaller_batch_the_batcher_would_form_for_it():
    # 3 s ahead; the typical batch of 8 would take 4.8 s: too late for a 6 s SLA at p95, but the batcher
    # sizes a batch by its tightest deadline, so the job is predicted in the largest batch that fits.
    tight = dataclasses.replace(REQ, sla_ms=6_000)
    d = decide(tight, POLICY, Snapshot((local(queue_ms=3_000, typical_batch=8),)))
    predicted = d.candidates[0].predicted_latency_ms
    assert predicted <= 6_000 and d.chosen.backend == "local"
    fits = max(n for n in range(1, 9) if (3_000 + PROFILE.seconds("sdxl", 1024, 1024, 30, n) * 1000) * P95 + 100
               <= 6_000)
    assert 1 < fits < 8
    assert predicted == pytest.approx((3_000 + PROFILE.seconds("sdxl", 1024, 1024, 30, fits) * 1000) * P95 + 100)


def test_a_tier_can_cap_how_long_it_queues_on_the_pool_so_tighter_tiers_keep_it():
    capped = Policy.model_validate({**POLICY.model_dump(exclude_none=True, by_alias=True),
                                    "tiers": {"standard": {"min_quality": 0.5, "local_max_ms": 5_000}}})
    snap = Snapshot((local(queue_ms=6_000), api("reve", p95_ms=10_000)))
    assert decide(REQ, POLICY, snap).chosen.backend == "local"  # 6 s queue fits the 30 s SLA
    d = decide(REQ, capped, snap)
    assert d.chosen.backend == "reve"
    assert any(r.backend == "local" and "local_max_ms" in r.detail for r in d.rejected)


def queued_local(points, running_s=0.0) -> BackendView:
    view = local()
    pool = dataclasses.replace(view.pool, work_ahead_s=running_s + (points[-1].work_s if points else 0),
                               running_s=running_s, queue=tuple(points), has_headroom=False)
    return dataclasses.replace(view, pool=pool)


def test_the_pool_may_hold_a_job_only_while_its_fallback_could_still_make_the_sla():
    d = decide(REQ, POLICY, WORLD)
    assert names(d)[:2] == ["local", "reve"]
    reve_p99 = LatencyModel(p50_ms=7_500, p95_ms=15_000).p99_ms  # lognormal through p50 and p95
    assert reve_p99 == pytest.approx(7_500 * 2 ** (2.326 / 1.645))
    assert d.candidates[0].start_within_ms == pytest.approx(30_000 - reve_p99)
    assert all(c.start_within_ms is None for c in d.candidates[1:])  # APIs do not queue
    alone = decide(REQ, POLICY, Snapshot((local(),)))
    assert alone.candidates[0].start_within_ms is None  # nowhere else to go: the pool keeps it


def test_a_tight_job_waits_only_for_work_due_before_it():
    # 40 s of tentative work due in 30 s is behind a draft due in 10 s: the batcher goes by deadline.
    snap = Snapshot((queued_local([QueuePoint(30.0, 40.0, 5.0, True)]), api("reve", 15_000)))
    tight = dataclasses.replace(REQ, sla_ms=10_000)
    d = decide(tight, POLICY, snap)
    assert d.chosen.backend == "local"
    assert d.chosen.predicted_latency_ms == pytest.approx(1_000 * P95 + 100)
    assert decide(REQ, POLICY, snap).chosen.backend == "reve"  # due in 30 s, it queues behind the 40 s


def test_a_job_that_would_push_committed_pool_work_past_its_deadline_goes_elsewhere():
    tight = dataclasses.replace(REQ, sla_ms=10_000)
    committed = QueuePoint(20.0, 3.0, 0.5, False)  # on time by 0.5 s, and it can no longer go elsewhere
    d = decide(tight, POLICY, Snapshot((queued_local([committed]), api("reve", 9_000))))
    assert d.chosen.backend == "reve"
    assert "committed" in next(r.detail for r in d.rejected if r.backend == "local")
    room = QueuePoint(20.0, 3.0, 5.0, False)  # 5 s of slack: one more 1 s job ahead leaves it on time
    assert decide(tight, POLICY, Snapshot((queued_local([room]), api("reve", 9_000)))).chosen.backend == "local"
    alone = decide(tight, POLICY, Snapshot((queued_local([QueuePoint(20.0, 3.0, 2.0, False)]),)))
    assert alone.chosen.backend == "local"  # nowhere else to go, and the committed job still makes it
    off = POLICY.model_copy(update={"reserve_pool": False})
    assert not decide(tight, off, Snapshot((queued_local([committed]),))).candidates  # it would not
    # With the pool's reservation on, committed flexible work was admitted predicted behind requests only the
    # pool can serve: one of those still has the pool (a sure miss elsewhere buys a likely one here).
    assert decide(tight, POLICY, Snapshot((queued_local([committed]),))).chosen.backend == "local"
    tentative = QueuePoint(20.0, 3.0, 0.5, True)  # a tentative job would be given back instead
    assert decide(tight, POLICY, Snapshot((queued_local([tentative]), api("reve", 9_000)))).chosen.backend == "local"


def test_every_combination_of_static_checks_gives_the_same_verdict_as_the_detailed_reasons():
    # decide() screens each backend with one fast check and asks for the detailed reason only when it fails:
    # the two must agree on every combination, or a backend would be lost or wrongly admitted.
    import itertools

    from policies.decide import _passes, _static_rejection

    views = [api("reve"), api("reve", health=Health.OPEN), api("reve", health=Health.HALF_OPEN),
             api("reve", health=Health.WARMING), api("reve", max_n=1),
             api("reve", sizes=SizeSupport(multiple_of=64)), api("reve", sizes=SizeSupport(max_pixels=500_000)),
             api("reve", sizes=SizeSupport(exact=frozenset({(1024, 1024)}))), api("mystery"), local()]
    changes = [{}, dict(tier="premium"), dict(tenant="acme"), dict(tenant="internal"), dict(backend="local"),
               dict(backend="reve"), dict(model="reve-v1"), dict(model="other"), dict(n=2),
               dict(width=1000, height=700), dict(width=4096, height=32), dict(tier="unknown-tier")]
    disabled = Policy.model_validate({**POLICY.model_dump(), "backends": {
        **POLICY.model_dump()["backends"], "reve": {"quality": 0.8, "enabled": False}}})
    for policy, view, change in itertools.product((POLICY, disabled), views, changes):
        request = dataclasses.replace(REQ, **change)
        tier_name = request.tier or policy.defaults.tier
        tier = policy.tiers.get(tier_name) or type(policy.tiers["standard"])()
        rule = policy.index.first_rule(request, tier_name)
        fast = _passes(view, view.name in policy.index.eligible(tier, rule), request)
        detailed = _static_rejection(view, policy.backends.get(view.name), request, tier, rule)
        assert fast == (detailed is None), (view, change, detailed)


def test_the_compiled_policy_answers_as_the_rules_read():
    idx = POLICY.index
    assert idx.first_rule(dataclasses.replace(REQ, tenant="acme"), "standard").name == "acme-no-gemini"
    assert idx.first_rule(dataclasses.replace(REQ, tags=frozenset({"interactive", "x"})), "standard").name == "fast-tag"
    assert idx.first_rule(REQ, "standard") is None
    assert idx.eligible(POLICY.tiers["premium"], None) == {"gemini"}
    acme = idx.first_rule(dataclasses.replace(REQ, tenant="acme"), "standard")
    assert idx.eligible(POLICY.tiers["standard"], acme) == {"local", "reve", "seedream"}
    assert POLICY.index is POLICY.index  # built once per policy


def unmeasured_local(has_headroom=True) -> BackendView:
    # A GPU pool whose profile never saw 768x1344: its guess comes from the prior (a CPU-scale constant).
    view = local(has_headroom=has_headroom)
    return dataclasses.replace(view, pool=dataclasses.replace(view.pool, profile=ThroughputProfile()))


def test_an_idle_pool_tries_a_shape_it_never_measured_instead_of_refusing_it_forever():
    req = RouteRequest(width=768, height=1344, sla_ms=12_000)
    d = decide(req, POLICY, Snapshot((unmeasured_local(), api("reve", 5_000))))
    assert d.candidates[0].predicted_latency_ms > 12_000  # the guess (~19.5 s) misses the SLA ...
    assert names(d) == ["local", "reve"] and d.candidates[0].probe  # ... but it is tried, reve behind it
    assert d.candidates[0].start_within_ms is None  # committed: a guess must not give it back unstarted
    assert "never ran this shape" in d.reason
    alone = decide(req, POLICY, Snapshot((unmeasured_local(),)))
    assert names(alone) == ["local"] and alone.candidates[0].probe  # better a try than a certain refusal


def test_no_probe_when_the_pool_is_busy_measured_or_the_fallback_needs_all_the_sla():
    req = RouteRequest(width=768, height=1344, sla_ms=12_000)
    busy = decide(req, POLICY, Snapshot((unmeasured_local(has_headroom=False), api("reve", 5_000))))
    assert names(busy) == ["reve"] and reasons(busy)["local"] is RejectReason.SLA_MISS
    tight = decide(req, POLICY, Snapshot((unmeasured_local(), api("reve", 11_990))))
    assert names(tight) == ["reve"] and "no slack" in next(r.detail for r in tight.rejected if r.backend == "local")
    measured = decide(dataclasses.replace(REQ, sla_ms=500), POLICY, Snapshot((local(), api("reve", 400))))
    assert names(measured) == ["reve"]  # a measured 1.0 s is not a guess: no probe


def test_a_best_effort_tier_serves_on_the_backend_predicted_to_finish_first_when_none_meets_the_sla():
    policy = POLICY.model_copy(update={"tiers": {**POLICY.tiers, "draft": POLICY.tiers["draft"].model_copy(
        update={"on_no_candidate": "best_effort"})}})
    busy = Snapshot((local(queue_ms=20_000), api("reve", 15_000), api("seedream", 12_000), api("gemini", 31_000)))
    d = decide(dataclasses.replace(REQ, tier="draft", sla_ms=5_000), policy, busy)
    assert d.at_risk and d.chosen.backend == "seedream"  # 12 s beats the pool's queue and reve
    assert names(d)[:2] == ["seedream", "reve"]
    assert "best effort" in d.reason and "5000 ms SLA" in d.reason
    assert all(r.reason is RejectReason.SLA_MISS for r in d.rejected)  # still says why each misses
    assert d.serve_within_ms == pytest.approx(1.5 * d.chosen.predicted_latency_ms)  # not cut at the SLA
    refused = decide(dataclasses.replace(REQ, tier="standard", sla_ms=5_000), policy, busy)
    assert not refused.candidates and not refused.at_risk  # a reject tier refuses as before
    capped = decide(dataclasses.replace(REQ, tier="draft", sla_ms=5_000, max_cost_usd=0.0001), policy,
                    Snapshot((api("reve", 15_000),)))
    assert not capped.candidates  # best effort never breaks the cost ceiling
    met = decide(dataclasses.replace(REQ, tier="draft"), policy, WORLD)
    assert not met.at_risk and met.serve_within_ms == met.sla_ms


def test_a_best_effort_request_no_backend_meets_is_served_by_a_pools_try_at_an_unmeasured_shape_past_its_sla():
    policy = POLICY.model_copy(update={"tiers": {**POLICY.tiers, "draft": POLICY.tiers["draft"].model_copy(
        update={"on_no_candidate": "best_effort"})}})
    req = RouteRequest(width=768, height=1344, tier="draft", sla_ms=1_000)  # the pool's guess is ~19.5 s
    alone = decide(req, policy, Snapshot((unmeasured_local(),)))
    assert alone.at_risk and names(alone) == ["local"] and alone.chosen.probe
    # bounded by the SLA, the try could not even start; at risk it has the time its guess says it needs
    assert alone.serve_within_ms == pytest.approx(1.5 * alone.chosen.predicted_latency_ms)
    late_api = decide(req, policy, Snapshot((unmeasured_local(), api("reve", 5_000))))
    assert late_api.at_risk and names(late_api) == ["reve", "local"]  # predicted to finish first goes first
    strict = decide(dataclasses.replace(req, tier="standard"), policy, Snapshot((unmeasured_local(),)))
    assert not strict.at_risk and strict.chosen.probe  # a reject tier still tries it within its SLA


def test_a_request_other_backends_can_serve_stays_off_a_pool_whose_room_is_reserved():
    reserved = dataclasses.replace(local(queue_ms=6_000), pool=dataclasses.replace(
        local(queue_ms=6_000).pool, reserved_share=0.8))  # drafts only the pool can serve took 80% of it
    world = Snapshot((reserved, api("reve", 15_000)))
    flexible = decide(dataclasses.replace(REQ, sla_ms=30_000), POLICY, world)  # 6 s ahead stretched to 30 s
    assert names(flexible) == ["reve"] and reasons(flexible)["local"] is RejectReason.RESERVED
    assert "kept for requests only it can serve" in next(r.detail for r in flexible.rejected)
    roomy = decide(dataclasses.replace(REQ, sla_ms=60_000), POLICY, world)  # the stretched wait still fits
    assert names(roomy)[0] == "local"
    only_pool = decide(dataclasses.replace(REQ, sla_ms=12_000), POLICY, world)  # reve's 15 s misses: pool only
    assert names(only_pool) == ["local"]
    off = POLICY.model_copy(update={"reserve_pool": False})
    assert names(decide(dataclasses.replace(REQ, sla_ms=30_000), off, world))[0] == "local"


def test_while_pool_only_work_takes_most_of_the_pool_over_a_minute_flexible_work_keeps_off_it():
    def world(sustained):
        view = local(queue_ms=0)  # nothing ahead: the stretched wait alone would admit it
        return Snapshot((dataclasses.replace(view, pool=dataclasses.replace(
            view.pool, reserved_share=sustained, sustained_share=sustained)), api("reve", 15_000)))

    flexible = dataclasses.replace(REQ, sla_ms=30_000)
    assert names(decide(flexible, POLICY, world(0.2)))[0] == "local"
    saturated = decide(flexible, POLICY, world(0.5))
    assert names(saturated) == ["reve"] and reasons(saturated)["local"] is RejectReason.RESERVED
    assert "over the last minute" in next(r.detail for r in saturated.rejected if r.backend == "local")
    only_pool = decide(dataclasses.replace(REQ, sla_ms=5_000), POLICY, world(0.5))
    assert names(only_pool) == ["local"]  # the work the room is kept for still has it
    off = POLICY.model_copy(update={"reserve_pool": False})
    assert names(decide(flexible, off, world(0.5)))[0] == "local"


def test_a_saturated_pool_still_takes_a_flexible_job_that_fits_on_an_idle_worker_between_pool_only_arrivals():
    def world(idle=True, cap=2.5):
        view = local(queue_ms=0, has_headroom=idle)
        return Snapshot((dataclasses.replace(view, pool=dataclasses.replace(
            view.pool, reserved_share=0.5, sustained_share=0.5, batch_cap_s=cap)), api("reve", 15_000)))

    small = dataclasses.replace(REQ, sla_ms=30_000)  # 1.0 s alone: no longer than the 2.5 s batches allowed
    assert names(decide(small, POLICY, world()))[0] == "local"
    big = dataclasses.replace(small, n=4)  # ~2.6 s alone: it would hold the worker past the cap
    assert names(decide(big, POLICY, world())) == ["reve"]
    assert names(decide(small, POLICY, world(idle=False))) == ["reve"]  # no idle worker: it would queue
    assert names(decide(small, POLICY, world(cap=None))) == ["reve"]  # no cap known: kept off, as before


def test_a_best_effort_request_keeps_off_a_pool_pressed_by_work_only_it_can_serve():
    policy = POLICY.model_copy(update={"tiers": {**POLICY.tiers, "draft": POLICY.tiers["draft"].model_copy(
        update={"on_no_candidate": "best_effort"})}})
    late = dataclasses.replace(REQ, tier="draft", sla_ms=5_000)

    def pool_with(share):
        view = local(queue_ms=8_000)  # ~8 s ahead: late on the pool, yet sooner than reve's 15 s
        return dataclasses.replace(view, pool=dataclasses.replace(view.pool, reserved_share=share))

    quiet = decide(late, policy, Snapshot((pool_with(0.1), api("reve", 15_000))))
    assert quiet.at_risk and names(quiet) == ["local", "reve"]  # predicted to finish first, nobody displaced
    pressed = decide(late, policy, Snapshot((pool_with(0.5), api("reve", 15_000))))
    # Half the pool goes to requests that can still be on time there: a late job would make them late too.
    assert pressed.at_risk and names(pressed) == ["reve", "local"]
    off = policy.model_copy(update={"reserve_pool": False})
    assert names(decide(late, off, Snapshot((pool_with(0.5), api("reve", 15_000)))))[0] == "local"


def test_a_request_placed_on_a_pressed_pool_is_hedged_so_an_api_win_hands_its_room_back():
    def world(share):
        view = local(queue_ms=2_000)
        return Snapshot((dataclasses.replace(view, pool=dataclasses.replace(view.pool, reserved_share=share)),
                         api("reve", 15_000)))

    flexible = dataclasses.replace(REQ, sla_ms=60_000)  # the pool first, reve in time behind it
    pressed = decide(flexible, POLICY, world(0.5))
    assert names(pressed) == ["local", "reve"] and pressed.hedge
    assert pressed.hedge_partner(pressed.candidates[0], pressed.candidates[1:]).backend == "reve"
    assert not decide(flexible, POLICY, world(0.1)).hedge  # a pool with room: hedging would only cost
    off = POLICY.model_copy(update={"dispatch": POLICY.dispatch.model_copy(update={"hedge_pressed_pool": False})})
    assert not decide(flexible, off, world(0.5)).hedge


def test_a_tier_sets_the_pools_steps_and_caps_them_and_the_pools_quality_follows_them():
    data = POLICY.model_dump(mode="json")
    data["backends"]["local"]["quality_by_steps"] = {20: 0.5, 30: 0.6, 40: 0.65}
    policy = Policy.model_validate({**data, "tiers": {
        "draft": {"steps": 20, "max_steps": 20}, "standard": {"min_quality": 0.5},
        "premium": {"min_quality": 0.62, "steps": 40}}})
    world = Snapshot((local(), api("reve", 15_000)))
    draft = decide(dataclasses.replace(REQ, tier="draft"), policy, world)
    assert draft.chosen.backend == "local" and draft.chosen.steps == 20 and draft.chosen.quality == 0.5
    asked_more = decide(dataclasses.replace(REQ, tier="draft", steps=50), policy, world)
    assert asked_more.chosen.steps == 20  # max_steps caps what a request asks
    faster = local().pool.completion_s(dataclasses.replace(REQ, tier="draft"), 20)
    assert faster < local().pool.completion_s(REQ, 30)  # pool time is linear in steps
    standard = decide(REQ, policy, world)
    assert standard.chosen.steps == 30  # the pool's own default where the tier names none
    premium = decide(dataclasses.replace(REQ, tier="premium"), policy, world)
    assert premium.chosen.backend == "local" and premium.chosen.quality == 0.65  # 40 steps reach its minimum
    low = decide(dataclasses.replace(REQ, tier="premium", steps=30), policy, world)
    assert reasons(low)["local"] is RejectReason.QUALITY_BELOW_TIER
    assert "at 30 steps" in next(r.detail for r in low.rejected if r.backend == "local")


def test_a_tier_whose_default_steps_exceed_its_maximum_is_refused_at_its_path():
    with pytest.raises(ValidationError) as err:
        Policy.model_validate({"tiers": {"draft": {"steps": 40, "max_steps": 20}}})
    assert "tiers.draft" in str(err.value) and "max_steps" in str(err.value)


def test_the_pool_keeps_room_for_work_only_it_can_serve_and_for_small_best_effort_work_sent_elsewhere():
    from policies.reservation import room_for

    policy = POLICY.model_copy(update={"tiers": {**POLICY.tiers, "draft": POLICY.tiers["draft"].model_copy(
        update={"on_no_candidate": "best_effort"})}})
    world = Snapshot((local(), api("reve", 15_000)))
    only_pool = dataclasses.replace(REQ, sla_ms=5_000)
    place, gpu_s = room_for(decide(only_pool, policy, world), world)
    assert place.backend == "local" and gpu_s == pytest.approx(1.0)  # its batch alone
    flexible = dataclasses.replace(REQ, sla_ms=30_000)
    assert room_for(decide(flexible, policy, world), world) is None  # reve serves it in time
    # Late everywhere (8 s ahead on the pool, reve's 15 s), yet the pool alone would serve it in 1.1 s of 5:
    # counted, even where it is sent to reve first, or the pool stops looking pressed as drafts go late.
    late = dataclasses.replace(REQ, tier="draft", sla_ms=5_000)
    busy = local(queue_ms=8_000)
    pressed = Snapshot((dataclasses.replace(busy, pool=dataclasses.replace(busy.pool, reserved_share=0.5)),
                        api("reve", 15_000)))
    decision = decide(late, policy, pressed)
    assert decision.at_risk and names(decision) == ["reve", "local"]
    assert room_for(decision, pressed)[0].backend == "local"
    big = dataclasses.replace(late, n=4)  # 2.4 s alone: more than half its SLA, room would not save it
    assert decide(big, policy, pressed).at_risk and room_for(decide(big, policy, pressed), pressed) is None


def test_where_worthier_requests_overtake_it_a_request_is_predicted_behind_them_while_they_can():
    # Drafts at 15 s worth $0.024 per 0.7 GPU-s have taken 40% of the pool; a standard image worth $0.024 per
    # 1.0 GPU-s, due in 30 s, finds 12 s ahead: drafts arriving in its first 15 s go ahead of it, deadline first.
    draft_worth, standard_worth = 0.024 / 0.7, 0.024 / 1.0
    view = local(queue_ms=12_000)
    pool = dataclasses.replace(view.pool, demand=((draft_worth, 15.0, 0.4, 0.4),))
    assert pool.denser_delay_s(30.0, standard_worth) == pytest.approx(0.4 * 15)  # capped: 12 / 0.6 > 15
    assert pool.denser_delay_s(30.0, draft_worth) == 0  # as worthy: no one overtakes it for that
    assert pool.denser_delay_s(10.0, standard_worth) == 0  # due before them: they cannot overtake it
    short = dataclasses.replace(pool, work_ahead_s=3.0)
    assert short.denser_delay_s(30.0, standard_worth) == pytest.approx(3.0 / 0.6 - 3.0)  # done before their window
    deep = dataclasses.replace(pool, work_ahead_s=22.0)  # 22 s ahead: ~25 s predicted, 31 s with them ahead
    world = Snapshot((dataclasses.replace(view, pool=deep), api("reve", 15_000)))
    standard = dataclasses.replace(REQ, sla_ms=30_000)
    assert names(decide(standard, POLICY, Snapshot((dataclasses.replace(view, pool=dataclasses.replace(
        deep, demand=())), api("reve", 15_000)))))[0] == "local"  # without them it would have the pool
    d = decide(standard, POLICY, world)
    assert names(d) == ["reve"] and reasons(d)["local"] is RejectReason.RESERVED
    assert "worth more per GPU-second" in next(r.detail for r in d.rejected if r.backend == "local")
    name, gpu_s, worth = d.pool_demand  # recorded for the next ones: its pool time alone and what it saves there
    assert name == "local" and gpu_s == pytest.approx(1.0) and worth == pytest.approx(0.024 / 1.0)


def preemptive_local(queue_ms=20_000.0, pool_only_running_s=0.0, reserved_share=0.0) -> BackendView:
    """A pool with `queue_ms` of flexible work ahead whose pool-only work pauses it (PoolModel.preemptive)."""
    view = local(queue_ms=queue_ms, has_headroom=False)
    return dataclasses.replace(view, pool=dataclasses.replace(
        view.pool, preemptive=True, pool_only_running_s=pool_only_running_s, reserved_share=reserved_share))


def test_on_a_pool_that_pre_empts_a_request_only_it_can_serve_in_time_goes_ahead_of_its_flexible_work():
    draft = RouteRequest(width=1024, height=1024, tier="draft", sla_ms=5_000)
    behind = decide(draft, POLICY, Snapshot((local(queue_ms=20_000), api("reve", 15_000))))
    assert not behind.candidates  # 20 s of flexible work ahead: refused
    ahead = decide(draft, POLICY, Snapshot((preemptive_local(pool_only_running_s=0.1), api("reve", 15_000))))
    assert names(ahead) == ["local"] and ahead.chosen.preempts
    # its own run (1.0 s) after a step of the batch it pauses, not after the 20 s of flexible work
    assert ahead.chosen.predicted_latency_ms == pytest.approx(100 + 1.1 * 1000 * P95, rel=0.01)


def test_a_request_another_backend_serves_in_time_waits_its_turn_on_a_pool_that_pre_empts():
    standard = RouteRequest(width=1024, height=1024, sla_ms=18_000)
    d = decide(standard, POLICY, Snapshot((preemptive_local(), api("reve", 15_000))))
    assert names(d) == ["reve"]
    detail = next(r.detail for r in d.rejected if r.backend == "local")
    assert "behind the pool's work" in detail and "another backend can serve it in time" in detail
    roomy = decide(dataclasses.replace(standard, sla_ms=60_000), POLICY,
                   Snapshot((preemptive_local(), api("reve", 15_000))))
    assert names(roomy) == ["local", "reve"] and not roomy.chosen.preempts  # flexible: queued behind the rest


def test_flexible_work_on_a_pool_that_pre_empts_is_predicted_paused_by_the_pool_only_share_for_its_whole_stay():
    req = RouteRequest(width=1024, height=1024, sla_ms=60_000)
    plain = decide(req, POLICY, Snapshot((preemptive_local(queue_ms=0.0), api("reve", 15_000))))
    shared = decide(req, POLICY, Snapshot((preemptive_local(queue_ms=0.0, reserved_share=0.5), api("reve", 15_000))))
    assert names(shared) == ["local", "reve"] and not shared.chosen.preempts
    own_ms = plain.chosen.predicted_latency_ms - 100  # the pool's part, past its fixed p95
    assert shared.chosen.predicted_latency_ms - 100 == pytest.approx(2 * own_ms)  # its run too, not its wait alone
