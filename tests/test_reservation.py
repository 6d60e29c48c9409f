"""Trunk reservation for the pool (policies.reservation): how long a batch may run and what share of the pool is
kept, read from the recent arrivals of requests only the pool can serve."""

from __future__ import annotations

import pytest

from policies.reservation import MAX_SHARE, InflexibleArrivals


def test_no_pool_only_arrivals_keep_no_room_and_cap_no_batch():
    arrivals = InflexibleArrivals()
    assert arrivals.share(100.0, workers=2) == 0.0 and arrivals.max_batch_s(100.0) is None


def test_a_batch_runs_at_most_what_a_pool_only_request_can_wait_its_own_batch_bounded_the_same():
    arrivals = InflexibleArrivals()
    arrivals.record(0.0, sla_s=5.0, service_s=0.7)  # a 5 s draft: it waits out one capped batch, then rides one
    assert arrivals.max_batch_s(1.0) == pytest.approx(2.5)
    arrivals.record(1.0, sla_s=5.0, service_s=3.5)  # four big images: its own run leaves 1.5 s
    assert arrivals.max_batch_s(2.0) == pytest.approx(1.5)
    assert arrivals.max_batch_s(70.0) is None  # forgotten after the window


def test_the_batch_cap_comes_back_up_when_the_request_that_set_it_leaves_the_window():
    arrivals = InflexibleArrivals(window_s=60.0)
    arrivals.record(0.0, sla_s=5.0, service_s=3.5)  # can wait 1.5 s
    arrivals.record(30.0, sla_s=5.0, service_s=0.7)  # 2.5 s
    arrivals.record(40.0, sla_s=8.0, service_s=0.7)  # 4 s: never the least while the 2.5 s one is recent
    assert arrivals.max_batch_s(50.0) == pytest.approx(1.5)
    assert arrivals.max_batch_s(61.0) == pytest.approx(2.5)
    assert arrivals.max_batch_s(95.0) == pytest.approx(4.0)
    assert arrivals.max_batch_s(101.0) is None


def test_shares_are_running_sums_that_return_to_exactly_nothing_once_every_record_has_left():
    arrivals = InflexibleArrivals(window_s=60.0, burst_window_s=10.0)
    for i in range(10_000):  # sums that a float would not return to zero by subtraction alone
        arrivals.record(i * 0.01, sla_s=5.0, service_s=0.1 + (i % 7) * 0.013)
    assert arrivals.sustained_share(99.0, workers=20) == pytest.approx(  # under MAX_SHARE on 20 workers
        sum(0.1 + (i % 7) * 0.013 for i in range(3900, 10_000)) / (60 * 20))
    assert arrivals.share(1000.0, workers=2) == 0.0 and arrivals.sustained_share(1000.0, workers=2) == 0.0
    arrivals.record(1000.0, sla_s=5.0, service_s=0.6)
    assert arrivals.sustained_share(1000.0, workers=1) == pytest.approx(0.01)  # no residue from before


def test_a_burst_is_seen_within_seconds_and_forgotten_over_the_window():
    arrivals = InflexibleArrivals(window_s=60.0, burst_window_s=10.0)
    for i in range(60):  # one 0.6 s draft every 3 s for three minutes: 10% of one worker
        arrivals.record(i * 3.0, sla_s=5.0, service_s=0.6)
    assert arrivals.share(180.0, workers=1) == pytest.approx(0.6 * 20 / 60, rel=0.2)
    for i in range(20):  # then two a second for ten seconds: 120% of one worker
        arrivals.record(180.0 + i * 0.5, sla_s=5.0, service_s=0.6)
    burst = arrivals.share(190.0, workers=1)
    assert burst == MAX_SHARE  # the last ten seconds, not the minute's average (0.3)
    assert arrivals.share(190.0, workers=2) == pytest.approx(0.6 * 20 / 20, rel=0.15)  # per worker
    assert arrivals.share(205.0, workers=1) < burst  # past the burst window the minute's average again
    # The sustained share is the minute's alone: the ten-second burst moves it only by its own GPU-seconds.
    # 11 of the 3 s drafts are within the minute before 205 s, and the whole burst
    assert arrivals.sustained_share(205.0, workers=1) == pytest.approx(0.6 * (11 + 20) / 60)
    assert arrivals.sustained_share(400.0, workers=1) == 0.0


def test_a_pool_job_is_raced_only_when_predicted_late_with_pool_only_work_still_going_ahead_of_it():
    from policies.reservation import HEDGE_MARGIN, hedge_pays

    assert not hedge_pays(4.0, due_in_s=10.0, share=0.0)  # well in time: an API call would be money thrown away
    assert hedge_pays(9.0, due_in_s=10.0, share=0.0)  # within the margin of its SLA: worth a race
    # Half the pool taken by pool-only work, which goes ahead of a queued job: its 4 s wait is 8 s...
    assert hedge_pays(4.0, due_in_s=10.0, share=0.5)
    # ...but nothing overtakes a running batch.
    assert not hedge_pays(4.0, due_in_s=10.0, share=0.5, running=True)
    assert hedge_pays(10.0 / HEDGE_MARGIN + 0.01, due_in_s=10.0, share=0.0, running=True)
    assert hedge_pays(1.0, due_in_s=5.0, share=1.0)  # a full share is capped (MAX_SHARE), never infinite


def test_pool_demand_is_summed_by_what_the_pool_is_worth_and_the_sla_over_a_minute_and_ten_seconds():
    from policies.reservation import PoolDemand

    demand = PoolDemand()
    for i in range(100):  # a 20-step draft (0.7 s) and a 30-step standard image (1.0 s), both worth $0.024 elsewhere
        demand.record(i * 0.5, sla_s=15.0, service_s=0.7, value=0.024 / 0.7)
        demand.record(i * 0.5, sla_s=30.0, service_s=1.0, value=0.024 / 1.0)
    table = {(round(value, 4), sla): (minute, burst) for value, sla, minute, burst in demand.table(50.0, workers=2)}
    assert len(table) == 2  # one entry per kind of request, however many arrive
    minute, burst = table[(round(0.024 / 0.7, 4), 15.0)]
    assert minute == pytest.approx(100 * 0.7 / 120) and burst == pytest.approx(20 * 0.7 / 20)  # 40 s on
    later = demand.table(200.0, workers=2)
    assert later == ()  # a minute on, forgotten
