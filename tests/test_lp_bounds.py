"""The offline LP bounds (benchmarks/lp_bounds.py): the most requests any router meets in time, and the least it
pays to meet a given share, on plain traces small enough to check by hand."""

from __future__ import annotations

import math
import sys

import pytest
import yaml

from policies.schema import Policy
from policies.simulate import simulate
from policies.traces import TraceRequest, synthetic
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import lp_bounds  # noqa: E402
import routing_economics as economics  # noqa: E402

POLICY = Policy.model_validate(yaml.safe_load((ROOT / "config" / "policy.yaml").read_text()))


def test_a_burst_of_drafts_beyond_the_pool_is_met_only_as_far_as_its_gpu_seconds_and_the_apis_odds_go():
    world = economics.world(1)
    burst = [TraceRequest(t=0.0, tier="draft", sla_ms=5_000) for _ in range(20)]
    b = lp_bounds.bounds(burst, POLICY, world)
    profile = world.pool.profile
    per_image = min(profile.seconds("sdxl", 1024, 1024, 20, k) / k for k in range(1, 9)
                    if profile.seconds("sdxl", 1024, 1024, 20, k) <= 5.0)  # the best batch that fits 5 s
    on_pool = 5.0 / per_image  # one GPU, due in 5 s
    any_api = 1 - math.prod(1 - a.p_within(5.0) for a in world.apis)
    assert b.max_sla_met == pytest.approx(on_pool + (20 - on_pool) * any_api, rel=1e-6)
    assert b.max_attainment < 0.8  # no router meets this burst, however it splits it
    assert lp_bounds.bounds(burst, POLICY, world, met=19.5).min_cost_usd is None  # beyond reach


def test_the_lp_bounds_what_our_router_achieves_and_pays_on_a_trace():
    world = economics.world(2)
    trace = synthetic("tight_drafts", 600, 1.0, seed=3)
    ours = simulate(trace, POLICY, world, seed=3).summary()
    met = sum(o.sla_met for o in simulate(trace, POLICY, world, seed=3).outcomes)
    top = lp_bounds.bounds(trace, POLICY, world)
    assert top.max_sla_met >= met
    cheapest = lp_bounds.bounds(trace, POLICY, world, met=0.97 * met)  # its expected share, with room for luck
    assert top.gpu_usd < cheapest.min_cost_usd <= ours["total_cost_usd"]
    everyone_late = lp_bounds.bounds(trace, POLICY, world, met=0)  # still pays an API for what the pool may not do
    premium = [r for r in trace if r.tier == "premium"]
    assert everyone_late.min_cost_usd >= top.gpu_usd + 0.024 * sum(r.n for r in premium) - 1e-9
