"""A pool warmed at one batch size only, on a GPU: does it predict and serve from what warm-up measured?

    python benchmarks/warm_profile_gpu.py [--preset sdxl] [--batch 8] [--out results.json]

The case from issue 15: `warm_shapes` batch 8 only, no calibrated profile. Before, every prediction came
from the prior (a CPU-scale constant: 125.9 GPU-s per image on an H200), so the pool refused all work.
Prints the warm-up timings (first run with its compile, then a timed run), the profile entry it left, the
predicted seconds for batches 1 and 8, and one served request (padded to the compiled batch), and checks
that a lone job launches without waiting for company.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.local import EngineSpec, LocalPool, PoolConfig, ThreadWorker, WarmShape  # noqa: E402
from backends.protocol import GenerationJob  # noqa: E402
from policies.profile import ThroughputProfile  # noqa: E402
from policies.types import RouteRequest  # noqa: E402


async def run(args) -> dict:
    size = {"sdxl": 1024, "sd15": 512, "tiny": 64}[args.preset]
    steps = {"sdxl": 30, "sd15": 30, "tiny": 2}[args.preset]
    spec = EngineSpec(preset=args.preset, device=args.device, run_sizes=(args.batch,),
                      cache_dir=Path("/tmp/imagegw-compile-cache"))
    worker = ThreadWorker(spec, "gpu-0", warm=[WarmShape(size, size, steps, batch=args.batch)])
    pool = LocalPool(spec, [worker], PoolConfig(max_batch=args.batch, run_sizes=(args.batch,),
                                               only_sizes=frozenset({(size, size)})))
    started = time.monotonic()
    await pool.start()
    await pool.wait_ready(timeout=1200)
    ready_s = time.monotonic() - started
    model = pool.load().pool
    predicted = {b: model.profile.seconds(pool.model, size, size, steps, b) for b in (1, args.batch)}
    prior = ThroughputProfile().seconds(pool.model, size, size, steps, 1)
    completion = model.completion_s(RouteRequest(width=size, height=size, sla_ms=60_000), steps)
    job = GenerationJob(id="probe", prompt="a red fox in snow", width=size, height=size, n=1, steps=steps, seed=1)
    t0 = time.monotonic()
    result = await pool.generate(job, time.monotonic() + 120)
    served_s = time.monotonic() - t0
    await pool.aclose()
    return {"preset": args.preset, "size": size, "steps": steps, "warmed_batch": args.batch,
            "ready_s": round(ready_s, 1), "warm_timings": worker.warm_timings,
            "profile_entry": {str(k): v for k, v in pool.profile.table.items()},
            "predicted_batch_s": predicted, "prior_batch1_s": round(prior, 2),
            "predicted_completion_s_lone_job": round(completion, 3), "served_s": round(served_s, 3),
            "served_batch_size": result.extra.get("batch_size"), "images": len(result.images)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sdxl", choices=["sdxl", "sd15", "tiny"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(f"command: python benchmarks/warm_profile_gpu.py --preset {args.preset} --batch {args.batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
