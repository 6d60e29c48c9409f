"""The local diffusion pool: real diffusers pipelines, deadline-aware batches, workers that crash and drain."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from backends.errors import BackendReleased, BackendTimeout, BackendTransientError, BackendUnavailable
from backends.local import DiffusionEngine, EngineSpec, LocalPool, PoolConfig, ProcessWorker, ThreadWorker, WarmShape
from backends.local.workers import WorkerCrashed
from backends.protocol import GenerationJob
from gateway.dispatch import Dispatcher
from gateway.guard import BackendGuard
from policies.profile import ThroughputProfile
from policies.reservation import PoolArrival
from policies.types import Candidate, Decision, Health, RouteRequest
from tests.fakes import FakeWorker, ScriptedBackend

TINY = EngineSpec(preset="tiny")


def job(i=0, n=1, size=64, steps=2, **kw) -> GenerationJob:
    return GenerationJob(id=f"job{i:04d}", prompt=f"prompt {i}", width=size, height=size, n=n, steps=steps, **kw)


@pytest.fixture(scope="module")
def tiny_engine():
    engine = DiffusionEngine(TINY)
    engine.load()
    return engine


# --- the engine ----------------------------------------------------------------------


def test_tiny_preset_is_a_real_pipeline_with_text_encoder_unet_scheduler_and_vae(tiny_engine):
    assert {"text_encoder", "tokenizer", "unet", "scheduler", "vae"} <= set(tiny_engine.pipe.components)
    images = tiny_engine.generate(["a fox"], width=128, height=96, steps=2, seeds=[1])
    assert images[0].size == (128, 96)


def test_prompt_and_seed_change_the_pixels_and_batching_does_not(tiny_engine):
    def px(prompts, seeds):
        return [im.tobytes() for im in tiny_engine.generate(prompts, width=64, height=64, steps=2, seeds=seeds)]

    alone = px(["a fox"], [1])[0]
    assert alone == px(["a fox"], [1])[0]
    assert alone != px(["a fox"], [2])[0] and alone != px(["a whale"], [1])[0]
    batched = px(["a whale", "a fox"], [1, 1])
    assert batched[1] != batched[0]
    # the fox in a batch is the fox alone, to within rounding (CPU matmul is not batch-invariant to the last bit)
    diff = np.abs(np.frombuffer(batched[1], np.uint8).astype(int) - np.frombuffer(alone, np.uint8).astype(int))
    assert diff.max() <= 2


def test_a_compiled_engine_pads_a_batch_up_to_a_compiled_size_and_returns_only_what_was_asked():
    engine = DiffusionEngine(EngineSpec(preset="tiny", run_sizes=(1, 4), compile_backend="jit"))
    engine.load()
    calls = []
    real_pipe = engine.pipe
    engine.pipe = lambda **kw: calls.append(len(kw["prompt"])) or real_pipe(**kw)
    engine.compiled = True  # as on CUDA under torch.compile, one graph per batch size
    padded = engine.generate(["a", "b", "c"], width=64, height=64, steps=2, seeds=[1, 2, 3])
    engine.compiled = False
    plain = engine.generate(["a", "b", "c"], width=64, height=64, steps=2, seeds=[1, 2, 3])
    assert calls == [4, 3]
    assert len(padded) == 3
    # Not byte-equal: a CPU matmul may block a batch of 4 differently from one of 3 (last-bit float
    # differences); the pixels must still agree to within rounding.
    for a, b in zip(padded, plain, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2


def test_a_compiled_pool_offers_only_warmed_sizes_and_batches_no_larger_than_warmed():
    config = PoolConfig(max_batch=8, run_sizes=(1, 4), only_sizes=frozenset({(1024, 1024)}))
    pool = LocalPool(EngineSpec(preset="sdxl"), [FakeWorker(seconds=lambda b: 0.1)], config)
    assert pool.offer.sizes.allows(1024, 1024) and not pool.offer.sizes.allows(768, 768)
    assert pool.batcher.max_batch == 4 and pool.profile.run_size(3) == 4


def test_images_quantised_on_the_device_equal_diffusers_own_pil_conversion():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from backends.local.engine import _to_pil

    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    ours = _to_pil(images.clone())
    theirs = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    assert [im.size for im in ours] == [(24, 16), (24, 16)]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, theirs, strict=True))


def test_weights_folder_loads_locally_without_the_hub(tiny_engine, tmp_path):
    tiny_engine.pipe.save_pretrained(tmp_path / "tiny-weights")
    engine = DiffusionEngine(EngineSpec(weights_dir=tmp_path / "tiny-weights"))
    engine.load()
    assert engine.generate(["x"], width=64, height=64, steps=2, seeds=[0])[0].size == (64, 64)


# --- the pool with the real tiny engine -------------------------------------------------


async def test_pool_warms_up_then_serves_pngs_off_the_event_loop(tiny_engine):
    worker = ThreadWorker(TINY, warm=[WarmShape(64, 64, 2)], engine=tiny_engine)
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0))
    assert pool.load().health is Health.WARMING
    with pytest.raises(BackendUnavailable):
        await pool.generate(job(), time.monotonic() + 5)
    await pool.start()
    await pool.wait_ready()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    result = await pool.generate(job(n=2, size=128), time.monotonic() + 30)
    t.cancel()
    assert ticks > 3 and len(result.images) == 2 and result.gpu_seconds > 0
    assert Image.open(io.BytesIO(result.images[0].data)).size == (128, 128)
    await pool.aclose()


async def test_concurrent_jobs_of_one_shape_share_batches(tiny_engine):
    worker = ThreadWorker(TINY, engine=tiny_engine)
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.05, max_batch=4))
    await pool.start()
    await pool.wait_ready()
    results = await asyncio.gather(*(pool.generate(job(i), time.monotonic() + 60) for i in range(8)))
    assert all(len(r.images) == 1 for r in results)
    assert pool.batches_run < 8 and max(r.extra["batch_size"] for r in results) > 1
    await pool.aclose()


async def test_warm_up_leaves_a_measured_profile_entry_so_a_pool_warmed_at_one_batch_size_serves():
    # Only batch 2 warmed, nothing calibrated: before, every prediction came from the prior (a CPU-scale
    # constant), which on a GPU put the pool out of every SLA for good.
    worker = ThreadWorker(TINY, "warm-0", warm=[WarmShape(64, 64, 2, batch=2)])
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0))
    await pool.start()
    await pool.wait_ready(timeout=120)
    timing = worker.warm_timings["64x64x2@2"]
    assert timing["steady_s"] > 0 and timing["first_s"] > 0
    assert pool.profile.table[("tiny", 64, 64, 2)] == {2: timing["steady_s"]}
    model = pool.load().pool
    alone = model.profile.seconds("tiny", 64, 64, 2, 1)
    assert alone == pytest.approx(timing["steady_s"] / 2)  # from the measured batch, not the prior
    prior = ThroughputProfile().seconds("tiny", 64, 64, 2, 1)
    assert alone != prior
    result = await pool.generate(job(1), time.monotonic() + 60)
    assert len(result.images) == 1
    await pool.aclose()


async def test_a_pool_is_ready_with_its_first_shape_and_warms_the_rest_while_idle():
    # A fresh GPU host used to wait for every shape (minutes each under torch.compile) before serving any.
    shapes = [WarmShape(64, 64, 2, batch=1), WarmShape(64, 64, 2, batch=2), WarmShape(96, 96, 2, batch=1)]
    worker = ThreadWorker(TINY, "grow-0", warm=shapes)
    config = PoolConfig(max_wait_s=0.0, max_batch=2, run_sizes=(1,), only_sizes=frozenset({(64, 64)}),
                        compiled="jit")
    pool = LocalPool(TINY, [worker], config)
    assert pool.offer.sizes.allows(64, 64) and not pool.offer.sizes.allows(96, 96)
    assert pool.batcher.max_batch == 1  # only what is warmed: batch 2 would compile while a client waits
    await pool.start()
    await pool.wait_ready(timeout=120)
    assert worker.warmed[:1] == shapes[:1]
    result = await pool.generate(job(1), time.monotonic() + 60)  # served before the rest is warm
    assert len(result.images) == 1
    deadline = time.monotonic() + 60
    while worker.pending_warm and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert worker.warmed == shapes and not worker.pending_warm
    assert pool.offer.sizes.allows(96, 96)
    assert pool.batcher.max_batch == 2 and pool.profile.run_sizes == (1, 2)
    assert set(pool.profile.table) == {("tiny", 64, 64, 2), ("tiny", 96, 96, 2)}  # each measured, none the prior
    assert "left to warm" not in pool.load().detail
    await pool.aclose()


async def test_a_size_no_ready_worker_has_warmed_is_not_offered():
    shapes = [WarmShape(64, 64, 2), WarmShape(96, 96, 2)]
    a, b = FakeWorker("a", warm=shapes), FakeWorker("b", warm=shapes, warm_seconds=30)
    pool = LocalPool(EngineSpec(preset="sdxl"), [a, b], PoolConfig(only_sizes=frozenset({(64, 64)}), compiled="aot"))
    await pool.start()
    await pool.wait_ready(timeout=5)
    deadline = time.monotonic() + 5
    while a.pending_warm and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert a.warmed == shapes and b.pending_warm  # b is still warming 96x96
    assert pool.offer.sizes.allows(64, 64) and not pool.offer.sizes.allows(96, 96)
    assert "1 shape(s) left to warm" in pool.load().detail
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 5  # a shutdown abandons a background warm-up (a compile takes minutes)


async def test_a_pool_of_thread_workers_shuts_down_at_once_while_they_compile_further_shapes_in_the_background():
    import threading

    gate = threading.Event()

    class CompilesSlowly:  # an engine whose second shape compiles for minutes
        pipe, compiled, aot = object(), False, None

        def is_prepared(self, width, height):
            return True

        def generate(self, prompts, *, width, **kw):
            if width == 96:
                gate.wait(60)

    shapes = [WarmShape(64, 64, 2), WarmShape(96, 96, 2)]
    workers = [ThreadWorker(EngineSpec(preset="tiny"), f"w{i}", warm=shapes, engine=CompilesSlowly())
               for i in range(2)]
    pool = LocalPool(EngineSpec(preset="tiny"), workers, PoolConfig())
    await pool.start()
    await pool.wait_ready(timeout=5)
    deadline = time.monotonic() + 5
    while not all(w.busy for w in workers) and time.monotonic() < deadline:  # both compiling 96x96
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 2 and all(w.state == "stopped" for w in workers)
    gate.set()  # the abandoned compiles end on their own; their threads are not waited for


async def test_a_worker_process_compiling_a_further_shape_in_the_background_is_killed_at_once_on_shutdown():
    # The child is not listening while it warms: asked to exit, it would be waited on for the whole warm-up.
    slow = WarmShape(512, 512, 400, batch=4)  # seconds of work for the tiny model on a CPU
    worker = ProcessWorker(TINY, "proc-0", warm=[WarmShape(64, 64, 2), slow])
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0))
    await pool.start()
    await pool.wait_ready(timeout=120)
    deadline = time.monotonic() + 30
    while not worker._warming_more and time.monotonic() < deadline:  # the pool found it idle: warming 512x512
        await asyncio.sleep(0.01)
    assert worker._warming_more and worker.pending_warm == [slow]
    process = worker._process
    started = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - started < 3 and not process.is_alive() and worker.state == "stopped"


@pytest.mark.parametrize("kind", [ThreadWorker, ProcessWorker])
async def test_a_pausable_batch_runs_a_batch_handed_to_it_between_its_steps_and_both_match_their_plain_runs(kind):
    from backends.local.workers import BatchRequest

    worker = kind(TINY, "w0", warm=[WarmShape(64, 64, 2)])
    await worker.start()
    long = BatchRequest(prompts=["a lighthouse", "a fox"], seeds=[1, 2], width=64, height=64, steps=150)
    short = BatchRequest(prompts=["a cat"], seeds=[5], width=96, height=64, steps=4)
    plain_long, plain_short = await worker.run(long), await worker.run(short)
    running = asyncio.create_task(worker.run(long, pausable=True))
    while not worker._pausable:  # the long batch is in its denoising loop
        await asyncio.sleep(0.005)
    paused = await worker.run_paused(short)
    assert not running.done()  # done between two of the long batch's steps, not after it
    resumed = await running
    assert np.array_equal(paused.pixels, plain_short.pixels) and np.array_equal(resumed.pixels, plain_long.pixels)
    assert resumed.timings["paused_s"] > 0  # left out of the long batch's own time, which the profile learns
    late = await worker.run_paused(short)  # nothing to pause: it runs on its own
    assert np.array_equal(late.pixels, plain_short.pixels)
    await worker.stop()


async def test_a_pool_that_pre_empts_runs_a_pool_only_job_inside_a_running_batch_and_says_so_to_the_policy():
    worker = ThreadWorker(TINY, "w0", warm=[WarmShape(64, 64, 2)])
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, preempt=True))
    await pool.start()
    await pool.wait_ready(timeout=60)
    assert pool.load().pool.preemptive
    flexible = asyncio.create_task(pool.generate(job(0, steps=150), time.monotonic() + 120))
    while not pool._pausable:  # the flexible batch runs, pausable
        await asyncio.sleep(0.005)
    urgent = asyncio.create_task(pool.generate(job(1, steps=2, preempts=True), time.monotonic() + 60))
    while not pool._pausing and not urgent.done():
        await asyncio.sleep(0.001)
    model = pool.load().pool
    assert model.pool_only_running_s > 0 and model.running_s > 0  # the pausing batch, and the paused one
    done = await urgent
    assert len(done.images) == 1 and not flexible.done()  # served between two of the flexible batch's steps
    assert len((await flexible).images) == 1
    assert pool.profile.seconds(pool.model, 64, 64, 150, 1) > 0 and pool.batches_run == 2
    await pool.aclose()


class PausingWorker(FakeWorker):
    """Runs a batch handed to it while it runs a pausable one (as ThreadWorker.run_paused), and says so."""

    pauses = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.paused_runs: list = []

    async def run(self, req, pausable=False):
        return await super().run(req)

    async def run_paused(self, req):
        self.paused_runs.append(req)
        return await super().run(req)


@pytest.mark.parametrize(("flexible_due_s", "pauses"), [(5.0, True), (1.3, False)])
async def test_a_pool_only_job_pauses_a_running_batch_only_if_that_batch_stays_on_time(flexible_due_s, pauses):
    worker = PausingWorker(seconds=lambda b: 1.0)
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 1.0}})
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, preempt=True), profile=profile))
    flexible = asyncio.create_task(pool.generate(job(0), time.monotonic() + flexible_due_s))
    while not worker.busy:
        await asyncio.sleep(0.005)
    urgent = asyncio.create_task(pool.generate(job(1, preempts=True), time.monotonic() + 5))
    assert len((await urgent).images) == len((await flexible).images) == 1
    # run inside the flexible batch, or after it (it had 0.3 s of slack, the pool-only batch takes 1 s)
    assert len(worker.paused_runs) == (1 if pauses else 0) and len(worker.batches) == 2
    await pool.aclose()


async def test_a_pool_only_job_waits_for_a_worker_that_cannot_pause_and_the_policy_is_told_it_cannot():
    worker = FakeWorker(seconds=lambda b: 0.3)  # a remote worker's proxy pauses nothing
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, preempt=True)))
    assert not pool.load().pool.preemptive
    flexible = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    while not worker.busy:
        await asyncio.sleep(0.005)
    urgent = await pool.generate(job(1, preempts=True), time.monotonic() + 5)
    assert flexible.done() and len(urgent.images) == 1  # after the running batch, ahead of nothing else
    await pool.aclose()


async def test_a_worker_process_killed_while_a_pool_only_batch_pauses_its_batch_reruns_both_after_its_restart():
    worker = ProcessWorker(TINY, "proc-0", warm=[WarmShape(64, 64, 2)])
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, preempt=True))
    await pool.start()
    await pool.wait_ready(timeout=120)
    pid = worker.pid
    flexible = asyncio.create_task(pool.generate(job(0, steps=300), time.monotonic() + 120))
    while not pool._pausable:
        await asyncio.sleep(0.005)
    urgent = asyncio.create_task(pool.generate(job(1, size=256, steps=60, preempts=True), time.monotonic() + 120))
    while not pool._pausing:  # the pool-only batch is in the child, inside the flexible one
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    assert len((await urgent).images) == 1 and len((await flexible).images) == 1
    assert worker.restarts == 1 and worker.pid != pid
    await pool.aclose()


async def test_a_crashed_worker_process_is_restarted_and_its_jobs_rerun():
    worker = ProcessWorker(TINY, "proc-0", warm=[WarmShape(64, 64, 2)])
    pool = LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0))
    await pool.start()
    await pool.wait_ready(timeout=120)
    pid = worker.pid
    pending = asyncio.create_task(pool.generate(job(1, size=256, steps=40), time.monotonic() + 120))
    while not worker.busy:  # the batch is in the child: kill it mid-batch
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    result = await pending
    assert len(result.images) == 1 and worker.restarts == 1 and worker.pid != pid
    await pool.aclose()


# --- scheduling, with fake workers (no diffusion) ---------------------------------------


class CrashingWorker(FakeWorker):
    """Crashes on its first batch; every start, the first included, takes `start_s`."""

    def __init__(self, start_s: float, **kw):
        super().__init__(**kw)
        self.start_s = start_s

    async def start(self) -> None:
        self.state = "warming"
        await asyncio.sleep(self.start_s)
        await super().start()

    async def run(self, req):
        if not self.restarts:
            self.state = "crashed"
            raise WorkerCrashed("killed (fake)")
        return await super().run(req)


async def test_a_restarting_worker_counts_as_busy_until_it_is_predicted_back_and_its_queue_waits_for_it():
    worker = CrashingWorker(start_s=0.4, seconds=lambda b: 0.05)
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=1)))
    first = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    while not worker.restarts:  # crashed on its batch: restarting, as long as its first start took
        await asyncio.sleep(0.01)
    report = pool.load()
    assert report.health is Health.OK and "restarting, back in" in report.detail
    assert report.pool.workers == 1 and report.pool.busy_workers == 1 and 0.2 < report.pool.running_s <= 0.45
    second = await pool.generate(job(1), time.monotonic() + 5)  # taken while it restarts, not refused
    assert len(second.images) == 1 and len((await first).images) == 1  # the crashed batch ran again
    await pool.aclose()


async def test_a_job_timed_out_in_the_queue_behind_a_restart_never_ejects_the_pool():
    # Ejecting the pool for its backlog would refuse the next requests while the queue drains: what the worker-kill
    # soak saw (five queued jobs timing out after a 4.5 s restart, then 10 s of 503s for forced local requests).
    worker = CrashingWorker(start_s=0.5, seconds=lambda b: 0.05)
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=1)))
    guard = BackendGuard("local")
    dispatcher = Dispatcher({"local": pool}, guards={"local": guard})
    local = Decision(policy_version="v", tier="standard", sla_ms=200, max_cost_usd=None, objective="min_cost",
                     rule=None, rejected=(), reason="test", candidates=(Candidate("local", "tiny", 50, 0.0, 0.6, 2),))
    crashed = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    while not worker.restarts:
        await asyncio.sleep(0.01)
    attempts: list = []
    late = await asyncio.gather(*(dispatcher.run(local, job(i), time.monotonic() + 0.2, attempts)
                                  for i in range(1, 8)), return_exceptions=True)
    assert all(isinstance(e, Exception) for e in late) and [a.outcome for a in attempts] == ["timeout"] * 7
    assert all(a.error_class == "BackendQueueTimeout" for a in attempts)
    assert guard.ejector.state == "serving"
    await crashed
    out = await dispatcher.run(local, job(9), time.monotonic() + 1, [])
    assert out.candidate.backend == "local"
    await pool.aclose()



async def start(pool):
    await pool.start()
    await pool.wait_ready()
    return pool


async def test_jobs_go_to_the_least_loaded_ready_worker():
    workers = [FakeWorker("w0", seconds=lambda b: 0.2), FakeWorker("w1", seconds=lambda b: 0.2)]
    pool = await start(LocalPool(TINY, workers, PoolConfig(max_wait_s=0.0, max_batch=1)))
    await asyncio.gather(*(pool.generate(job(i), time.monotonic() + 5) for i in range(4)))
    assert len(workers[0].batches) == 2 and len(workers[1].batches) == 2
    await pool.aclose()


async def test_one_failing_batch_fails_only_its_own_jobs():
    worker = FakeWorker(fail_on="prompt 1")
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=1)))
    results = await asyncio.gather(*(pool.generate(job(i), time.monotonic() + 5) for i in range(3)),
                                   return_exceptions=True)
    assert isinstance(results[1], BackendTransientError) and "out of memory" in str(results[1])
    assert len(results[0].images) == 1 and len(results[2].images) == 1
    await pool.aclose()


async def test_a_job_that_expires_in_the_queue_never_runs():
    worker = FakeWorker(seconds=lambda b: 0.3)
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=1)))
    first = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    await asyncio.sleep(0.01)
    with pytest.raises(BackendTimeout):
        await pool.generate(job(1), time.monotonic() + 0.1)
    await first
    await asyncio.sleep(0.05)
    assert [b.prompts for b in worker.batches] == [["prompt 0"]]
    await pool.aclose()


async def test_shutdown_drains_queued_and_running_jobs():
    worker = FakeWorker(seconds=lambda b: 0.1)
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=2)))
    tasks = [asyncio.create_task(pool.generate(job(i), time.monotonic() + 10)) for i in range(6)]
    await asyncio.sleep(0.01)
    await pool.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results)
    with pytest.raises(BackendUnavailable):
        await pool.generate(job(9), time.monotonic() + 1)


async def test_predicted_completion_is_within_25_percent_of_the_observed():
    # A batch of b takes 0.1 + 0.05 b s; the profile is learned from what the pool observes.
    worker = FakeWorker(seconds=lambda b: 0.1 + 0.05 * b)
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.15, 4: 0.3}})
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=4), profile))
    # Put work ahead of the probe, then compare the snapshot's prediction with what happens.
    ahead = [asyncio.create_task(pool.generate(job(i), time.monotonic() + 10)) for i in range(8)]
    await asyncio.sleep(0.01)
    model = pool.load().pool
    predicted = model.completion_s(RouteRequest(width=64, height=64), steps=2)
    started = time.monotonic()
    await pool.generate(job(99), time.monotonic() + 10)
    observed = time.monotonic() - started
    await asyncio.gather(*ahead)
    assert abs(predicted - observed) / observed < 0.25, (predicted, observed)
    await pool.aclose()


async def test_cost_per_image_follows_observed_occupancy():
    worker = FakeWorker(seconds=lambda b: 0.1 + 0.01 * b)
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.11, 8: 0.18}})
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.05, max_batch=8), profile))
    alone = pool.load().pool.gpu_seconds_per_image(RouteRequest(width=64, height=64), 2)
    for _ in range(5):
        await asyncio.gather(*(pool.generate(job(i), time.monotonic() + 10) for i in range(8)))
    busy = pool.load().pool.gpu_seconds_per_image(RouteRequest(width=64, height=64), 2)
    assert busy < alone / 3  # batches of 8: a fraction of the GPU-seconds per image
    await pool.aclose()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_sd15_on_gpu_in_bf16_compiled():
    import torch

    engine = DiffusionEngine(EngineSpec(preset="sd15"))
    engine.load()
    assert engine.pipe.vae.dtype == torch.bfloat16
    assert engine.generate(["x"], width=512, height=512, steps=2, seeds=[0])[0].size == (512, 512)


async def test_a_job_the_pool_would_finish_late_is_given_back_at_once_for_the_next_candidate():
    # Batches of one take 0.2 s. Four jobs due in 1.0 s fill the pool until then; a job due a little later,
    # which reve could still serve, is released straight away rather than kept to miss its deadline.
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.2}})
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.2)], PoolConfig(max_wait_s=0.0, max_batch=1),
                                 profile))
    now = time.monotonic()
    ahead = [asyncio.create_task(pool.generate(job(i), now + 1.0)) for i in range(4)]
    await asyncio.sleep(0.01)
    api = ScriptedBackend("reve")
    candidates = (Candidate("local", "tiny", 500, 0.0, 0.6, 2, start_within_ms=300),
                  Candidate("reve", "m1", 400, 0.024, 0.8, 30))
    decision = Decision(policy_version="v", tier="standard", sla_ms=1050, max_cost_usd=None, objective="min_cost",
                        rule=None, candidates=candidates, rejected=(), reason="test")
    attempts = []
    started = time.monotonic()
    out = await Dispatcher({"local": pool, "reve": api}).run(decision, job(9), started + 1.05, attempts)
    assert out.candidate.backend == "reve" and time.monotonic() - started < 0.15
    assert [(a.backend, a.error_class) for a in attempts] == [("local", "BackendReleased"), ("reve", None)]
    await asyncio.gather(*ahead)
    assert pool.load().health is Health.OK
    await pool.aclose()


async def test_a_job_still_on_time_when_its_fallback_window_closes_stays_on_the_pool():
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.1}})
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.1)], PoolConfig(max_wait_s=0.0, max_batch=1),
                                 profile))
    now = time.monotonic()
    result = await pool.generate(job(1, start_by=now), now + 2)
    assert len(result.images) == 1
    await pool.aclose()


async def test_a_tentative_job_is_released_against_the_remote_workers_backlog_too_as_the_policy_predicted_it():
    # The shared stream holds ten batches no worker has taken yet (other gateways' work): load() counts them
    # ahead of a new job, so the release of a tentative job must count them as well.
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.1}})
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.1)], PoolConfig(max_wait_s=0.0, max_batch=1),
                                 profile))
    now = time.monotonic()
    await pool.generate(job(1), now + 2)  # one batch run: the pool knows its cycle (0.1 s)
    pool.external_batches = lambda: 10
    assert pool.load().pool.running_s == pytest.approx(1.0, rel=0.3)
    now = time.monotonic()
    with pytest.raises(BackendReleased):
        await pool.generate(job(2, start_by=now + 0.3), now + 0.8)  # 1 s of backlog ahead: late, handed on
    pool.external_batches = lambda: 0
    now = time.monotonic()
    assert len((await pool.generate(job(3, start_by=now + 0.3), now + 0.8)).images) == 1
    await pool.aclose()


async def test_the_pool_tells_the_dispatcher_whether_a_job_it_holds_is_late_enough_to_race():
    # Batches of one take 0.2 s on one worker: the running job ends in 0.2 s, the queued one in 0.4 s.
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.2}})
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.2)], PoolConfig(max_wait_s=0.0, max_batch=1),
                                 profile))
    now = time.monotonic()
    running = asyncio.create_task(pool.generate(job(0), now + 5))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(pool.generate(job(1), now + 5))
    await asyncio.sleep(0.01)
    assert not pool.hedge_pays("job0000", now + 1.0) and pool.hedge_pays("job0000", now + 0.2)
    assert not pool.hedge_pays("job0001", now + 1.0)  # 0.4 s x the margin, well before its SLA
    assert pool.hedge_pays("job0001", now + 0.45)  # on time, but with nothing to spare
    assert pool.hedge_pays("unknown", now + 5)  # not held here: the dispatcher's elapsed time is all there is
    await asyncio.gather(running, queued)
    assert pool.hedge_pays("job0001", now + 5)  # delivered: forgotten
    await pool.aclose()


async def test_a_hedged_pool_job_the_pool_predicts_on_time_is_not_raced_by_the_dispatcher():
    profile = ThroughputProfile({("tiny", 64, 64, 2): {1: 0.2}})
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.2)], PoolConfig(max_wait_s=0.0, max_batch=1),
                                 profile))
    api = ScriptedBackend("reve")
    candidates = (Candidate("local", "tiny", 50, 0.0, 0.6, 2), Candidate("reve", "m1", 400, 0.024, 0.8, 30))

    def hedged(sla_ms):
        return Decision(policy_version="v", tier="standard", sla_ms=sla_ms, max_cost_usd=None, objective="min_cost",
                        rule=None, candidates=candidates, rejected=(), reason="test", hedge=True)

    # Predicted 50 ms, it takes 0.2 s: past its prediction the pool still sees it well within a 2 s SLA.
    out = await Dispatcher({"local": pool, "reve": api}).run(hedged(2_000), job(1), time.monotonic() + 2, [])
    assert out.candidate.backend == "local" and not api.calls
    # Behind a 0.2 s batch with 0.3 s to its SLA, it is predicted late enough: reve races it.
    ahead = asyncio.create_task(pool.generate(job(2), time.monotonic() + 5))
    await asyncio.sleep(0.01)
    await Dispatcher({"local": pool, "reve": api}).run(hedged(300), job(3), time.monotonic() + 2, [])
    assert len(api.calls) == 1
    await ahead
    await pool.aclose()


async def test_a_cancelled_job_leaves_the_queue_at_once():
    # A hedge that won elsewhere, or a client that went away: the job must not stay counted as work ahead.
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.3)], PoolConfig(max_wait_s=0.0, max_batch=1)))
    running = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(pool.generate(job(1), time.monotonic() + 5))
    await asyncio.sleep(0.01)
    assert len(pool.batcher) == 1
    queued.cancel()
    await asyncio.sleep(0)
    assert len(pool.batcher) == 0
    await running
    await pool.aclose()


def test_a_batch_is_encoded_in_parallel_into_the_same_pixels_in_the_same_order(tiny_engine):
    import io

    import numpy as np
    from PIL import Image

    from backends.local.encode import encode_batch, encode_pil

    pixels = tiny_engine.generate(["a", "b", "c"], width=64, height=64, steps=2, seeds=[1, 2, 3], output_type="uint8")
    pils = tiny_engine.generate(["a", "b", "c"], width=64, height=64, steps=2, seeds=[1, 2, 3])
    pngs = encode_batch(pixels, "png")
    assert [np.asarray(Image.open(io.BytesIO(b))).tolist() for b in pngs] == [np.asarray(im).tolist() for im in pils]
    assert encode_batch(pixels, "jpeg") == [encode_pil(im, "jpeg") for im in pils]
    assert [Image.open(io.BytesIO(b)).format for b in encode_batch(pixels[:1], "webp")] == ["WEBP"]


def test_a_png_striped_over_threads_is_one_valid_stream_with_every_pixel():
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from backends.local.png import encode_png

    rng = np.random.default_rng(0)
    for shape in [(1024, 1024, 3), (333, 517, 3), (1, 8, 4), (700, 300, 4)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        with ThreadPoolExecutor(4) as pool:
            data = encode_png(pixels, pool)
        image = Image.open(io.BytesIO(data))
        image.load()  # decompresses every row and checks the CRCs and the zlib checksum
        assert np.array_equal(np.asarray(image), pixels)


def test_loading_the_engine_says_nothing_of_image_processors_it_does_not_use():
    import subprocess
    import sys

    # a fresh process: transformers says it once per process
    done = subprocess.run([sys.executable, "-c", "from backends.local.engine import DiffusionEngine, EngineSpec;"
                           "DiffusionEngine(EngineSpec(preset='tiny')).load(); print('loaded')"],
                          capture_output=True, text=True, timeout=120)
    assert "loaded" in done.stdout and "requires torchvision" not in done.stderr, done.stderr


def test_the_configured_compile_cache_wins_over_the_folder_diffusers_set_on_import(tmp_path, monkeypatch):
    import diffusers  # noqa: F401 (it sets TORCHINDUCTOR_CACHE_DIR as it loads, on some versions)

    from backends.local.optimize import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_somebody")  # as a library would
    use_compile_cache(tmp_path / "cache")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(tmp_path / "cache")  # what inductor will use when it compiles


async def test_closed_loop_clients_answered_together_fill_whole_batches_instead_of_splitting_for_good():
    # Eight clients that resubmit as soon as they are answered (a few ms apart): before, the batches split into
    # 3 and 5 for good (the wait for company was counted from arrival, and a mean gap called each burst's first
    # job lonely), at 68% of full-batch throughput.
    import collections
    import random

    worker = FakeWorker("closed", seconds=lambda b: 0.2 + 0.02 * b)
    pool = LocalPool(EngineSpec(preset="sdxl"), [worker], PoolConfig(max_batch=8, max_wait_s=0.1))
    await pool.start()
    await pool.wait_ready(timeout=5)
    rng, stop = random.Random(1), time.monotonic() + 4

    async def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            await pool.generate(job(k * 1000 + i, size=1024, steps=30), time.monotonic() + 60)
            i += 1
            await asyncio.sleep(rng.uniform(0, 0.02))

    await asyncio.gather(*(client(k) for k in range(8)))
    sizes = collections.Counter(len(b.prompts) for b in worker.batches)
    assert sizes[8] >= 0.8 * sum(sizes.values()), sizes
    await pool.aclose()


async def test_jobs_only_the_pool_could_serve_set_the_room_it_keeps_for_them():
    pool = await start(LocalPool(TINY, [FakeWorker(seconds=lambda b: 0.05)], PoolConfig(max_wait_s=0.0, max_batch=1)))
    assert pool.load().pool.reserved_share == 0 and pool.batcher.max_batch_s() is None  # nothing pool-only yet
    await pool.generate(job(0), time.monotonic() + 5)
    assert pool.load().pool.reserved_share == 0  # a job with other candidates reserves nothing
    pool.note_arrival(PoolArrival("local", 5.0, 0.05, 0.0, keep_room=True))  # one it keeps room for (room_for)
    assert pool.load().pool.reserved_share > 0  # its GPU-seconds over the window, per worker
    limit = pool.batcher.max_batch_s()
    # No batch runs longer than it could wait: its 5 s less its own batch, which the same cap bounds (half).
    assert limit == pytest.approx(2.5, abs=0.1)
    assert pool.load().pool.batch_cap_s == pytest.approx(limit)  # what decide() lets fit between such work
    pool.note_arrival(PoolArrival("local", 30.0, 1.0, 0.024, keep_room=False))  # by what it saves per GPU-second
    (value, sla, minute, burst), = [row for row in pool.load().pool.demand if row[1] == 30.0]
    assert (value, sla) == (0.024, 30.0) and minute == pytest.approx(1.0 / 60) and burst == pytest.approx(1.0 / 10)
    await pool.aclose()


async def test_a_worker_takes_its_next_batch_while_the_last_ones_images_are_encoded():
    """The engine hands back pixels; the pool encodes them on a thread while the worker already runs the next
    batch, so encoding is never part of the GPU's cycle (and the images still arrive as the asked format)."""
    import threading

    import backends.local.workers as workers
    from backends.local.workers import BatchOutput

    encoding = threading.Event()
    started_while_encoding = []

    class PixelWorker(FakeWorker):
        async def run(self, req):
            started_while_encoding.append(encoding.is_set())
            await asyncio.sleep(0.05)
            return BatchOutput([], 0.05, pixels=np.zeros((len(req.prompts), 8, 8, 3), np.uint8), output_format="png")

    real = workers.encode_pixels

    def slow_encode(pixels, fmt):
        encoding.set()
        time.sleep(0.3)
        return real(pixels, fmt)

    original, workers.encode_pixels = workers.encode_pixels, slow_encode
    pool = await start(LocalPool(TINY, [PixelWorker()], PoolConfig(max_wait_s=0.0, max_batch=1)))
    try:
        results = await asyncio.gather(*(pool.generate(job(i), time.monotonic() + 10) for i in range(2)))
    finally:
        workers.encode_pixels = original
        await pool.aclose()
    assert started_while_encoding == [False, True]  # the second batch ran while the first was being encoded
    assert all(r.images[0].data.startswith(b"\x89PNG") for r in results)


def test_a_gateway_with_worker_processes_counts_its_gpus_without_loading_torch_itself():
    # Torch held resident in the gateway only to count devices cost ~200 MB per replica: the count comes from a
    # child process, and the gateway process never imports torch (its workers do).
    import json
    import subprocess
    import sys

    probe = ("import json, sys; from gateway.registry import _devices; "
             "print(json.dumps([_devices('auto', 'process'), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    devices, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    if _cuda():
        assert devices and all(d.startswith("cuda:") for d in devices)
    else:
        assert devices == ["cpu"]
    assert torch_loaded is False


class DiesWhileRestarting(CrashingWorker):
    """Crashes on its first batch, then its first `failures` restarts die too (killed again while warming)."""

    def __init__(self, failures: int, **kw):
        super().__init__(start_s=0.0, **kw)
        self.failures = failures

    async def restart(self) -> None:
        self.restarts += 1
        self.state = "warming"
        if self.restarts <= self.failures:
            raise WorkerCrashed("killed again while restarting (fake)")
        await self.start()


async def test_a_worker_that_dies_again_while_restarting_is_tried_again_until_it_is_back(monkeypatch):
    import backends.local.pool as pool_module

    monkeypatch.setattr(pool_module, "RESTART_BACKOFF_S", (0.05, 0.1))
    worker = DiesWhileRestarting(failures=3, seconds=lambda b: 0.02)
    pool = await start(LocalPool(TINY, [worker], PoolConfig(max_wait_s=0.0, max_batch=1)))
    crashed = asyncio.create_task(pool.generate(job(0), time.monotonic() + 5))
    while worker.state != "failed":
        await asyncio.sleep(0.001)
    report = pool.load()  # between tries: not predicted back, so nothing waits for it and requests go elsewhere
    assert report.health is Health.UNCONFIGURED and "restart failed" in report.detail
    assert "trying again in" in report.detail
    result = await crashed  # the crashed batch runs once a restart holds
    assert len(result.images) == 1 and worker.restarts == 4 and worker.ready
    again = await pool.generate(job(1), time.monotonic() + 5)
    assert len(again.images) == 1
    await pool.aclose()
