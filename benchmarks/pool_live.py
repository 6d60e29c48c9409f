"""The local pool serving live traffic on a GPU: deadline-aware batches, and how well its predicted
completion (what `decide()` reads in the snapshot) matches what then happens.

Poisson arrivals at each rate; every job gets an SLA drawn from --slas. As the gateway does, a job is
sent to the pool only when the pool's predicted p95 completion (as decide() computes it) meets its SLA,
else it counts as overflow (the policy would send it to an API). Prints, per rate: admitted / overflow,
deadlines met, prediction error, the batch sizes formed, GPU busy share and images/s.

With --api P50,P95 (seconds), each job is routed by the real `decide()` between the pool and an emulated
API with that lognormal latency (the fallback), and served to the end: on the pool, or on the API when
routed there or when the pool gives it back (late binding, `BackendReleased`). Each rate then runs twice,
late binding on and off, and the table adds SLA met over all jobs, by SLA, and releases.

    python benchmarks/pool_live.py --model sd15 --batches 1,4,8 --rates 4,10 --duration 30
    python benchmarks/pool_live.py --model sd15 --batches 1,2,4,8 --rates 6,10 --slas 2,4 --api 0.8,2.0
    python benchmarks/pool_live.py --model tiny --batches 1,4 --rates 4 --duration 5   # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.errors import BackendReleased  # noqa: E402
from backends.local import EngineSpec, LocalPool, PoolConfig, ThreadWorker, WarmShape  # noqa: E402
from backends.local.calibrate import calibrate  # noqa: E402
from backends.protocol import GenerationJob  # noqa: E402
from policies.decide import decide  # noqa: E402
from policies.schema import Policy  # noqa: E402
from policies.types import BackendKind, BackendView, Health, LatencyModel, RouteRequest, SizeSupport, Snapshot  # noqa: E402

SHAPES = {"sdxl": (1024, 30), "sd15": (512, 30), "tiny": (64, 4)}


async def start_pool(args) -> tuple[LocalPool, float]:
    size, steps = SHAPES[args.model]
    spec = EngineSpec(preset=args.model, run_sizes=tuple(args.batches))
    worker = ThreadWorker(spec, "gpu-0", [WarmShape(size, size, steps, b) for b in args.batches])
    config = PoolConfig(max_batch=max(args.batches), max_wait_s=args.max_wait_ms / 1000, run_sizes=tuple(args.batches))
    pool = LocalPool(spec, [worker], config)
    started = time.perf_counter()
    await pool.start()
    await pool.wait_ready(timeout=900)
    warm_s = time.perf_counter() - started
    # Calibrate on the serving thread (CUDA graphs belong to the thread that recorded them).
    profile = await asyncio.get_running_loop().run_in_executor(
        worker._executor, lambda: calibrate(worker.engine, args.model, [(size, size, steps)], args.batches, repeats=2))
    pool.profile = dataclasses.replace(profile, run_sizes=tuple(args.batches))
    row = {b: round(s, 3) for b, s in sorted(next(iter(profile.table.values())).items())}
    print(f"warm-up (load + compile {args.batches}) {warm_s:.0f}s; calibrated seconds per batch {row}", flush=True)
    return pool, warm_s


async def drive(pool: LocalPool, args, rate: float, rng: random.Random) -> dict:
    size, steps = SHAPES[args.model]
    records, overflow, tasks = [], 0, []
    batches_before = pool.batches_run

    async def one(i: int, sla: float, predicted: float) -> None:
        started = time.monotonic()
        job = GenerationJob(id=f"r{rate}-{i}", prompt=f"prompt {i}", width=size, height=size, steps=steps)
        try:
            result = await pool.generate(job, started + sla)
            records.append({"sla": sla, "predicted": predicted, "observed": time.monotonic() - started,
                            "batch": result.extra["batch_size"], "gpu_s": result.gpu_seconds, "ok": True})
        except Exception as exc:  # a deadline the pool could not meet
            records.append({"sla": sla, "predicted": predicted, "observed": time.monotonic() - started,
                            "batch": 0, "gpu_s": 0.0, "ok": False, "error": type(exc).__name__})

    began = time.monotonic()
    i = 0
    while time.monotonic() - began < args.duration:
        await asyncio.sleep(rng.expovariate(rate))
        sla = rng.choice(args.slas)
        model = pool.load().pool
        request = RouteRequest(width=size, height=size, sla_ms=int(sla * 1000))
        predicted = model.completion_s(request, steps)
        p95 = LatencyModel(0, 0).predict(request, steps, "p95", model) / 1000  # what decide() checks the SLA with
        if p95 > sla:
            overflow += 1
        else:
            tasks.append(asyncio.create_task(one(i, sla, predicted)))
        i += 1
    await asyncio.gather(*tasks)
    wall = time.monotonic() - began
    done = [r for r in records if r["ok"]]
    errors = [abs(r["predicted"] - r["observed"]) / r["observed"] for r in done]
    met = [r for r in done if r["observed"] <= r["sla"]]
    return {
        "rate": rate, "offered": i, "admitted": len(records), "overflow": overflow,
        "deadlines_met": len(met) / max(len(records), 1), "failed": len(records) - len(done),
        "pred_err_p50": statistics.median(errors) if errors else float("nan"),
        "pred_err_p90": statistics.quantiles(errors, n=10)[-1] if len(errors) >= 10 else float("nan"),
        "batch_sizes": dict(sorted(collections.Counter(r["batch"] for r in done).items())),
        "batches": pool.batches_run - batches_before,
        "gpu_busy": sum(r["gpu_s"] for r in done) / wall, "images_per_s": len(done) / wall,
        "latency_p50": statistics.median(r["observed"] for r in done) if done else float("nan"),
    }


def routing(args) -> tuple[Policy, BackendView]:
    """The policy and the emulated API's view for routing with decide() (pool first while it is cheaper)."""
    p50, p95 = args.api
    policy = Policy.model_validate({
        "defaults": {"tier": "standard", "sla_ms": 60_000}, "tiers": {"standard": {"min_quality": 0.5}},
        "backends": {"local": {"quality": 0.6}, "api": {"quality": 0.8, "price_per_image_usd": 0.024}}})
    api = BackendView(name="api", kind=BackendKind.API, health=Health.OK, models=("api",), sizes=SizeSupport(),
                      max_n=10, default_steps=30, latency=LatencyModel(p50 * 1000, p95 * 1000))
    return policy, api


async def drive_routed(pool: LocalPool, args, rate: float, rng: random.Random, late_binding: bool) -> dict:
    """Every job routed by decide() between the pool and the emulated API, and served to the end."""
    size, steps = SHAPES[args.model]
    policy, api = routing(args)
    sigma = (math.log(args.api[1] / args.api[0])) / 1.645
    offer = pool.offer
    records, tasks = [], []

    async def on_api() -> None:
        await asyncio.sleep(rng.lognormvariate(math.log(args.api[0]), sigma))

    async def one(i: int, sla: float, candidates) -> None:
        started = time.monotonic()
        where, released = candidates[0].backend, False
        if where == "local":
            within = candidates[0].start_within_ms if late_binding else None
            job = GenerationJob(id=f"r{rate}-{i}", prompt=f"prompt {i}", width=size, height=size, steps=steps,
                                start_by=None if within is None else started + within / 1000)
            try:
                await pool.generate(job, started + sla)
            except BackendReleased:
                released, where = True, "api"
                await on_api()
            except Exception:  # missed its deadline on the pool
                records.append({"sla": sla, "where": "local", "ok": False, "released": False})
                return
        else:
            await on_api()
        observed = time.monotonic() - started
        records.append({"sla": sla, "where": where, "ok": observed <= sla, "released": released})

    began, i = time.monotonic(), 0
    while time.monotonic() - began < args.duration:
        await asyncio.sleep(rng.expovariate(rate))
        sla = rng.choice(args.slas)
        view = BackendView(name="local", kind=BackendKind.LOCAL, health=Health.OK, models=offer.models,
                           sizes=SizeSupport(), max_n=offer.max_n, default_steps=steps,
                           latency=LatencyModel(50, 250), pool=pool.load().pool)
        request = RouteRequest(width=size, height=size, steps=steps, sla_ms=int(sla * 1000))
        decision = decide(request, policy, Snapshot((view, api)))
        if decision.candidates:
            tasks.append(asyncio.create_task(one(i, sla, decision.candidates)))
        else:
            records.append({"sla": sla, "where": None, "ok": False, "released": False})
        i += 1
    await asyncio.gather(*tasks)
    by_sla = {sla: [r for r in records if r["sla"] == sla] for sla in args.slas}
    return {
        "rate": rate, "late_binding": late_binding, "offered": i,
        "to_pool": sum(1 for r in records if r["where"] == "local"),
        "released": sum(r["released"] for r in records),
        "to_api": sum(1 for r in records if r["where"] == "api"),
        "sla_met": sum(r["ok"] for r in records) / max(1, len(records)),
        "sla_met_by_sla": {sla: sum(r["ok"] for r in rs) / max(1, len(rs)) for sla, rs in by_sla.items()},
        "missed_on_pool": sum(1 for r in records if r["where"] == "local" and not r["ok"]),
        "missed_on_api": sum(1 for r in records if r["where"] == "api" and not r["ok"]),
        "profile_after": {b: round(t, 3) for b, t in sorted(next(iter(pool.profile.table.values())).items())},
    }


async def main_async(args) -> dict:
    rng = random.Random(args.seed)
    pool, warm_s = await start_pool(args)
    out = {"model": args.model, "command": " ".join(sys.argv), "warm_s": warm_s, "rows": []}
    try:
        import torch

        out["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        for rate in args.rates:
            rows = [await drive_routed(pool, args, rate, random.Random(args.seed), late) for late in (True, False)] \
                if args.api else [await drive(pool, args, rate, rng)]
            for row in rows:
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=1))
    finally:
        await pool.aclose()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="sd15")
    p.add_argument("--batches", default="1,4,8", help="compiled (warmed) batch sizes")
    p.add_argument("--rates", default="4,10", help="arrivals per second, one run each")
    p.add_argument("--slas", default="1.0,2.0,4.0", help="SLA seconds, drawn uniformly per job")
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--max-wait-ms", type=float, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--api", help="P50,P95 seconds: route with decide() between the pool and an API like this")
    p.add_argument("--out")
    args = p.parse_args()
    args.api = [float(x) for x in args.api.split(",")] if args.api else None
    args.batches = [int(b) for b in args.batches.split(",")]
    args.rates = [float(r) for r in args.rates.split(",")]
    args.slas = [float(s) for s in args.slas.split(",")]
    out = asyncio.run(main_async(args))
    print(f"\n{out['card']}, {args.model}; command: `{out['command']}`")
    if args.api:
        print("| rate/s | late binding | offered | to pool | given back | to API (all) | SLA met | by SLA "
              "| missed on pool / API |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in out["rows"]:
            by = ", ".join(f"{s:g}s {v:.1%}" for s, v in r["sla_met_by_sla"].items())
            print(f"| {r['rate']:g} | {'on' if r['late_binding'] else 'off'} | {r['offered']} | {r['to_pool']} "
                  f"| {r['released']} | {r['to_api']} | {r['sla_met']:.1%} | {by} "
                  f"| {r['missed_on_pool']} / {r['missed_on_api']} |")
        return
    print("| rate/s | offered | to pool | overflow (to APIs) | deadlines met | p50 latency s "
          "| prediction error p50 / p90 | batch sizes (images: count) | GPU busy | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['rate']:g} | {r['offered']} | {r['admitted']} | {r['overflow']} | {r['deadlines_met']:.1%} "
              f"| {r['latency_p50']:.2f} | {r['pred_err_p50']:.0%} / {r['pred_err_p90']:.0%} | {r['batch_sizes']} "
              f"| {r['gpu_busy']:.0%} | {r['images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
