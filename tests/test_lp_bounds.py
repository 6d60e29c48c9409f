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


def test_the_lps_plan_meets_in_full_what_a_pool_that_cannot_pre_empt_misses():
    """Its fluid pool fits a 5 s draft beside an 8-image batch; a real one must finish the batch first."""
    world = economics.world(1)
    trace = [TraceRequest(t=0.0, tier="standard", sla_ms=20_000, n=8), TraceRequest(t=0.5, tier="draft", sla_ms=5_000)]
    b, planned = lp_bounds.plan(trace, POLICY, world, met=2)
    assert b.max_sla_met == pytest.approx(2) and planned == [("local",), ("local",)]
    replayed = lp_bounds.replay(trace, POLICY, world, planned)
    assert replayed["sla_by_tier"] == {"standard": 1.0, "draft": 0.0}  # the draft waits out the running batch


def test_the_plan_names_for_each_request_the_backends_its_lp_chose_and_gives_up_no_more_than_it_may():
    world = economics.world(2)
    trace = synthetic("tight_drafts", 600, 1.0, seed=3)
    b, planned = lp_bounds.plan(trace, POLICY, world, met=0.99 * len(trace))
    assert len(planned) == len(trace) and b.met == pytest.approx(0.99 * len(trace))
    names = {a.name for a in world.apis} | {"local"}
    assert all(set(choice) <= names for choice in planned)
    assert sum(choice == () for choice in planned) <= 0.02 * len(trace)  # rounding may give up a few more
    premium = [choice for r, choice in zip(sorted(trace, key=lambda r: r.t), planned, strict=True)
               if r.tier == "premium" and choice]
    assert premium and all("local" not in choice for choice in premium)  # the pool's quality is below premium's
    b_beyond, planned_beyond = lp_bounds.plan(trace, POLICY, world, met=len(trace) + 1)  # out of reach: its maximum
    assert b_beyond.met == pytest.approx(b_beyond.max_sla_met) and len(planned_beyond) == len(trace)


def test_a_held_back_trace_file_is_benchmarked_as_it_is_and_a_tier_the_policy_lacks_is_named(tmp_path, capsys,
                                                                                             monkeypatch):
    from policies.traces import dump_jsonl

    trace = synthetic("tight_drafts", 180, 1.0, seed=4)
    held = tmp_path / "held.jsonl"
    held.write_text(dump_jsonl(trace))
    monkeypatch.setattr(sys, "argv", ["routing_economics.py", "--traces", "", "--trace-file", str(held),
                                      "--sweep", "2.0"])
    economics.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| file |")]
    ours = simulate(trace, POLICY, economics.world(2), seed=1).summary()
    assert len(rows) == 1 and rows[0].startswith(f"| file | held.jsonl | {ours['gpu_utilisation']:.0%} "
                                                 f"| {ours['sla_attainment']:.2%} |")  # the file, not a 2/s trace

    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"t": 0.5, "tier": "gold"}\n')
    with pytest.raises(SystemExit, match=r"gold.jsonl: tiers \['gold'\] are not in the policy's tiers"):
        economics.trace_files([str(gold)], POLICY)
    tiers_only = [TraceRequest(t=r.t, tier=r.tier) for r in trace]  # SLAs from the policy's tiers, as routed
    assert economics.lower_bound(tiers_only, POLICY, economics.world(2)) <= \
        simulate(tiers_only, POLICY, economics.world(2), seed=1).summary()["total_cost_usd"]
