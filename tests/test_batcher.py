"""The SLA-aware batcher as a specification (a fake clock, a known profile)."""

from __future__ import annotations

import pytest

from backends.local.batcher import QueuedJob, SLABatcher
from policies.profile import ThroughputProfile

KEY = ("sdxl", 1024, 1024, 30, 5.0)
OTHER = ("sdxl", 768, 768, 30, 5.0)
# SDXL on an H100 (design.md): batch 1 takes 1.1 s, batch 8 takes 7.5 s.
PROFILE = ThroughputProfile({("sdxl", 1024, 1024, 30): {1: 1.1, 2: 2.0, 4: 3.8, 8: 7.5},
                             ("sdxl", 768, 768, 30): {1: 0.7, 8: 4.0}})


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def batcher(clock):
    return SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=0.1, clock=clock)


def job(clock, deadline_in, key=KEY, slots=1, waited=0.0):
    return QueuedJob(key=key, slots=slots, deadline=clock.now + deadline_in, enqueued=clock.now - waited)


def test_jobs_are_grouped_by_compatibility_key(batcher, clock):
    for _ in range(3):
        batcher.put(job(clock, 60, waited=1))
    batcher.put(job(clock, 60, key=OTHER, waited=1))
    batch, _ = batcher.next_batch()
    assert batch.key == KEY and batch.slots == 3
    batch, _ = batcher.next_batch()
    assert batch.key == OTHER and batch.slots == 1


def test_batch_size_is_the_largest_that_meets_every_deadline_in_it(batcher, clock):
    # Six queued; the tightest needs its result within 4 s: a batch of 4 (3.8 s) fits, 5 (~4.7 s) does not.
    batcher.put(job(clock, 4.0))
    for _ in range(5):
        batcher.put(job(clock, 60))
    batch, _ = batcher.next_batch()
    assert batch.slots == 4 and batch.predicted_s == pytest.approx(3.8)
    assert batch.reason == "backlog"  # more work than one batch: launch now
    assert batcher.pending_slots == 2


def test_a_full_batch_launches_at_once(batcher, clock):
    for _ in range(9):
        batcher.put(job(clock, 60))
    batch, _ = batcher.next_batch()
    assert batch.slots == 8 and batch.reason == "full"


def test_a_lone_job_waits_for_company_but_no_longer_than_max_wait(batcher, clock):
    batcher.put(job(clock, 60))
    batch, wake = batcher.next_batch()
    assert batch is None and wake == pytest.approx(clock.now + 0.1)
    clock.now += 0.1
    batch, _ = batcher.next_batch()
    assert batch.slots == 1 and batch.reason == "max_wait"


def test_a_tight_deadline_launches_early_without_waiting(clock):
    patient = SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=10.0, clock=clock)
    patient.put(job(clock, 1.9))  # a batch of 2 would take 2.0 s: waiting for company would break this SLA
    batch, _ = patient.next_batch()
    assert batch is not None and batch.reason == "deadline"


def test_waiting_is_bounded_by_the_tightest_deadline(clock):
    patient = SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=10.0, clock=clock)
    patient.put(job(clock, 5.0))
    batch, wake = patient.next_batch()
    assert batch is None and wake == pytest.approx(clock.now + 5.0 - 2.0)  # latest start for a batch of 2
    clock.now = wake
    batch, _ = patient.next_batch()
    assert batch.reason == "deadline"


def test_n_greater_than_one_fills_several_slots(batcher, clock):
    batcher.put(job(clock, 60, slots=3, waited=1))
    batcher.put(job(clock, 60, slots=4, waited=1))
    batcher.put(job(clock, 60, slots=2, waited=1))
    batch, _ = batcher.next_batch()
    assert batch.slots == 7 and len(batch.jobs) == 2


def test_earliest_deadline_goes_first_across_keys_so_no_key_starves(batcher, clock):
    for _ in range(20):
        batcher.put(job(clock, 60))
    batcher.put(job(clock, 30, key=OTHER, waited=1))
    batch, _ = batcher.next_batch()
    assert batch.key == OTHER


def test_a_job_that_cannot_make_its_deadline_launches_at_once_without_shrinking_the_batch(batcher, clock):
    # Late even alone, it is late whatever the batch: capping the batch at its deadline would only cost
    # throughput (in overload, batches of one for everyone behind it).
    batcher.put(job(clock, 0.5))
    batcher.put(job(clock, 60))
    batch, _ = batcher.next_batch()
    assert batch.slots == 2 and batch.jobs[0].deadline == clock.now + 0.5 and batch.reason == "deadline"


def test_withdrawn_jobs_never_launch(batcher, clock):
    a = job(clock, 60, waited=1)
    batcher.put(a)
    assert batcher.remove(a) and batcher.next_batch() == (None, None)


def test_profile_interpolates_and_scales_unmeasured_shapes():
    assert PROFILE.seconds("sdxl", 1024, 1024, 30, 6) == pytest.approx(3.8 + 2 * (7.5 - 3.8) / 4)
    assert PROFILE.seconds("sdxl", 1024, 1024, 15, 1) == pytest.approx(0.55)  # half the steps
    unknown = PROFILE.seconds("other-model", 512, 512, 20, 1)
    assert unknown > 0  # conservative prior
    updated = PROFILE.observe("sdxl", 1024, 1024, 30, 1, 2.1)
    assert updated.seconds("sdxl", 1024, 1024, 30, 1) == pytest.approx(0.7 * 1.1 + 0.3 * 2.1)
    assert PROFILE.seconds("sdxl", 1024, 1024, 30, 1) == 1.1  # immutable
    assert type(PROFILE).from_json(PROFILE.to_json()) == PROFILE


def test_with_compiled_batch_sizes_a_batch_costs_the_size_it_pads_up_to():
    compiled = ThroughputProfile(PROFILE.table, run_sizes=(1, 4, 8))
    assert compiled.seconds("sdxl", 1024, 1024, 30, 3) == 3.8  # runs as a batch of 4
    assert compiled.seconds("sdxl", 1024, 1024, 30, 5) == 7.5
    assert compiled.observe("sdxl", 1024, 1024, 30, 3, 4.0).table[("sdxl", 1024, 1024, 30)][4] == \
        pytest.approx(0.7 * 3.8 + 0.3 * 4.0)


def test_padding_shapes_the_batch_the_deadlines_allow(clock):
    # 3 jobs due in 3 s: unpadded, a batch of 2 or 3 (2.0-2.9 s) would fit; padded to 4 it takes 3.8 s.
    compiled = ThroughputProfile(PROFILE.table, run_sizes=(1, 4, 8))
    b = SLABatcher(lambda: compiled, max_batch=8, max_wait_s=0.1, clock=clock)
    for _ in range(3):
        b.put(job(clock, 3.0))
    batch, _ = b.next_batch()
    assert batch.slots == 1 and batch.predicted_s == 1.1


# --- late binding: tentative jobs (those with somewhere else to go) -------------------------

def tentative(clock, deadline_in, start_in, **kw):
    item = job(clock, deadline_in, **kw)
    item.start_by = clock.now + start_in
    return item


def test_a_tentative_job_predicted_late_is_given_back_at_once_and_a_committed_one_never(batcher, clock):
    for _ in range(16):  # two full batches, committed: 15 s of work ahead of anything due later
        batcher.put(job(clock, 20))
    late = tentative(clock, 25, start_in=5)  # 7.5 s running + 15 s + its own 1.1 s, with the margin: > 25 s
    stuck = job(clock, 25)  # no start_by: nowhere else to go, it stays whatever its prediction
    batcher.put(late)
    batcher.put(stuck)
    assert batcher.settle(clock.now, running_s=7.5, workers=1) == [late]
    assert len(batcher) == 17 and stuck in batcher.drain()


def test_a_tentative_job_still_on_time_at_its_start_by_is_committed_and_kept(batcher, clock):
    keep = tentative(clock, 30, start_in=2)
    batcher.put(keep)
    assert batcher.next_settle() == clock.now + 2
    assert batcher.settle(clock.now, running_s=0, workers=1) == [] and keep.tentative  # not due yet
    clock.now += 2
    assert batcher.settle(clock.now, running_s=0, workers=1) == [] and not keep.tentative
    assert batcher.next_settle() is None
    for _ in range(40):  # a flood of tighter work later cannot make it give a committed job back
        batcher.put(job(clock, 5))
    assert batcher.settle(clock.now, running_s=0, workers=1) == []


def test_the_queue_is_seen_in_deadline_order_with_the_work_up_to_each_job(batcher, clock):
    batcher.put(job(clock, 30))
    batcher.put(job(clock, 10))
    batcher.put(job(clock, 20, key=OTHER))
    points = batcher.points(clock.now, running_s=1.0, workers=1)
    assert [p.deadline_in_s for p in points] == [10, 20, 30]
    # 1 s running; then a KEY batch of 1 (1.1 s), an OTHER batch of 1 (0.7 s), the KEY job joins a batch of 2
    assert [p.work_s for p in points] == pytest.approx([2.1, 2.8, 3.7])
    assert not any(p.tentative for p in points)


def test_with_arrivals_a_lone_job_waits_only_when_company_is_likely(clock):
    from policies.batching import ArrivalRate

    adaptive = SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=0.1, clock=clock, arrivals=ArrivalRate())
    adaptive.put(job(clock, 60))  # nothing known of arrivals: no company expected, no idle wait at batch 1
    batch, _ = adaptive.next_batch()
    assert batch is not None and batch.slots == 1 and batch.reason == "no_company"
    for _ in range(5):  # then a busy stream, a job every 20 ms: company is likely within 100 ms
        clock.now += 0.02
        adaptive.put(job(clock, 60))
        adaptive.next_batch()
    clock.now += 0.02
    adaptive.put(job(clock, 60))
    assert adaptive.wait_s(next(iter(adaptive._queues))) == 0.1
    for _ in range(6):  # and when the stream thins out to a job every 2 s, a lone job goes at once again
        clock.now += 2.0
        adaptive.put(job(clock, 60))
        batch, _ = adaptive.next_batch()
    assert batch is not None and batch.reason == "no_company"


def test_company_is_expected_from_bursts_of_arrivals_not_from_their_mean_gap():
    from policies.batching import ArrivalRate

    bursts, sparse, t = ArrivalRate(), ArrivalRate(), 0.0
    for _ in range(4):  # eight clients answered together: seven short gaps, then one as long as a batch
        for _ in range(8):
            t += 0.005
            bursts.arrived("k", t)
        t += 1.0
    assert bursts.expects_company("k", 0.1)  # a mean gap (~0.13 s) would have said no
    for i in range(20):
        sparse.arrived("k", i * 1.0)
    assert not sparse.expects_company("k", 0.1) and not sparse.expects_any(0.1)
    assert not ArrivalRate().expects_company("k", 0.1)  # nothing seen yet: nobody to wait for


def test_while_room_is_kept_no_batch_runs_longer_than_the_cap_and_a_lone_big_job_still_runs(clock):
    cap = [None]
    batcher = SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=0.1, clock=clock, max_batch_s=lambda: cap[0])
    for _ in range(8):
        batcher.put(job(clock, 60))
    cap[0] = 4.0  # requests only the pool can serve can wait 4 s: a batch of 8 (7.5 s) would make them late
    batch, _ = batcher.next_batch()
    assert len(batch.jobs) == 4 and batch.predicted_s <= 4.0
    cap[0] = None  # none arriving any more: full batches again
    batcher.put(job(clock, 60, slots=4))
    batch, _ = batcher.next_batch()
    assert batch.slots == 8
    cap[0] = 1.0
    batcher.put(job(clock, 60, slots=2))
    clock.now += 0.2  # past its wait for company
    batch, _ = batcher.next_batch()
    assert batch.slots == 2  # its own run is longer than the cap: it runs alone rather than never


def test_withdrawing_expired_jobs_leaves_the_rest_queued_and_counts_no_new_arrivals(clock):
    from policies.batching import ArrivalRate

    arrivals = ArrivalRate()
    batcher = SLABatcher(lambda: PROFILE, max_batch=8, max_wait_s=0.1, clock=clock, arrivals=arrivals)
    expired, due_later = job(clock, 1.0), job(clock, 30.0, key=OTHER)
    batcher.put(expired)
    clock.now += 10.0  # a lone arrival every 10 s: nobody is coming within the 0.1 s wait
    batcher.put(due_later)
    gaps = {key: list(g) for key, g in arrivals._gaps.items()}
    assert batcher.take(lambda j: j.deadline <= clock.now) == [expired]
    assert len(batcher) == 1 and {key: list(g) for key, g in arrivals._gaps.items()} == gaps
    assert not arrivals.expects_company(OTHER, 0.1)  # a put-back would have counted a zero gap
