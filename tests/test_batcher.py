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


def test_a_job_that_cannot_make_its_deadline_runs_alone_at_once(batcher, clock):
    batcher.put(job(clock, 0.5))
    batcher.put(job(clock, 60))
    batch, _ = batcher.next_batch()
    assert batch.slots == 1 and batch.jobs[0].deadline == clock.now + 0.5


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
