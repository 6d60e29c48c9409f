"""How long a fresh GPU worker takes to serve: with no compiled artifacts, with artifacts built elsewhere, and with
only a warm compile cache. Each case is a fresh process (imports, pipeline build, compile or load, one timed run
per warm shape), timed from its spawn to the first shape ready and to all shapes ready.

    python benchmarks/cold_start.py --preset sdxl --out cold_start.json            # on a GPU host
    python benchmarks/cold_start.py --preset sdxl --backend aot --out cold_start_aot.json
    python benchmarks/cold_start.py --preset tiny --size 256 --steps 4 --device cpu # the same, on a CPU

Cases, in order (each reuses what the earlier ones left, as a real fleet would):
  no-artifacts  empty artifact folder and compile cache: compiles, and saves the artifacts (`imagegw pool build`)
  artifacts     the packages built above, an empty compile cache (a folder copied to a new host)
  warm-cache    no packages but the compile cache the first case filled (a restart that lost its artifacts)
With --measure, the artifacts case also times the engine at batch 1 and the largest batch and the encoders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ("no-artifacts", "artifacts", "warm-cache")


def _child(args) -> None:
    t0 = float(args.t0)

    def event(kind: str, **fields) -> None:
        print(json.dumps({"event": kind, "t": round(time.time() - t0, 2), **fields}), flush=True)

    from backends.local.engine import DiffusionEngine, EngineSpec

    event("imported")
    batches = [int(b) for b in args.batches.split(",")]
    spec = EngineSpec(preset=args.preset, device=args.device, compile=True, compile_backend=args.backend,
                      artifacts_dir=Path(args.artifacts), cache_dir=Path(args.cache), max_batch=max(batches),
                      run_sizes=tuple(batches))
    engine = DiffusionEngine(spec)
    engine.load()
    event("loaded", load_s=round(engine.load_seconds, 2), **engine.load_phases)
    timings = engine.prepare(args.size, args.size, lambda d: event("progress", detail=d))
    event("prepared", **timings)

    def run(batch: int, output_type: str = "pil"):
        return engine.generate([f"cold start {i}" for i in range(batch)], width=args.size, height=args.size,
                               steps=args.steps, seeds=list(range(batch)), output_type=output_type)

    run(1)  # first use of the size: kernels load, cuDNN and cuBLAS pick algorithms
    for batch in batches:
        started = time.perf_counter()
        run(batch)
        event("shape_ready", batch=batch, seconds=round(time.perf_counter() - started, 3))
    _compile_times(event)
    if args.save and args.backend == "jit":  # AOT packages were saved as they were built
        event("saved", bytes=engine.save_jit_cache())
    if args.measure:
        _measure(engine, run, batches, event)


def _compile_times(event) -> None:
    """Where torch.compile spent the start (dynamo's per-phase totals): what a cache hit still costs."""
    try:
        import torch

        event("compile_times", detail=str(torch._dynamo.utils.compile_times(repr="str", aggregate=True))[-3000:])
    except Exception as exc:  # private API: absent or changed in another torch
        event("compile_times", detail=f"unavailable: {exc}")


def _measure(engine, run, batches, event) -> None:
    import statistics

    import torch
    from PIL import Image

    from backends.local.encode import encode_batch, encode_pil

    def timed(fn, repeats):
        times = []
        for _ in range(repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    big = max(batches)
    b1 = timed(lambda: run(1, "uint8"), 5)
    bn = timed(lambda: run(big, "uint8"), 3)
    event("engine", batch1_s=round(b1, 4), **{f"batch{big}_s_per_image": round(bn / big, 4)})
    pixels = run(big, "uint8")
    pils = [Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy()]
    rows = {}
    for fmt in ("png", "jpeg", "webp"):
        rows[f"{fmt}_1_ours_s"] = round(timed(lambda f=fmt: encode_batch(pixels[:1], f), 5), 4)
        rows[f"{fmt}_1_pillow_s"] = round(timed(lambda f=fmt: encode_pil(pils[0], f), 5), 4)
        rows[f"{fmt}_{big}_ours_s"] = round(timed(lambda f=fmt: encode_batch(pixels, f), 3), 4)
    rows["png_bytes"] = len(encode_batch(pixels[:1], "png")[0])
    event("encode", **rows)


def _run_case(case: str, args, root: Path) -> list[dict]:
    artifacts = root / ("artifacts" if case != "warm-cache" else "artifacts-empty")
    cache = root / ("cache" if case != "artifacts" else "cache-empty")
    for folder in (artifacts, cache):
        if case == "no-artifacts" or folder.name.endswith("-empty"):
            shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "--t0", str(time.time()), "--preset", args.preset,
           "--size", str(args.size), "--steps", str(args.steps), "--batches", args.batches, "--device", args.device,
           "--artifacts", str(artifacts), "--cache", str(cache), "--backend", args.backend] + \
        (["--measure"] if case == "artifacts" and args.measure else []) + (["--save"] if case == "no-artifacts" else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    events = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))
                print(f"  [{case}] {line.strip()}", flush=True)
            elif "Error" in line or "WARNING" in line:
                print(f"  [{case}] {line.rstrip()}", flush=True)
    return events


def _summary(case: str, events: list[dict]) -> dict:
    ready = [e for e in events if e["event"] == "shape_ready"]
    prepared = next((e for e in events if e["event"] == "prepared"), {})
    row = {"case": case, "first_shape_s": ready[0]["t"] if ready else None,
           "all_shapes_s": ready[-1]["t"] if ready else None,
           "load_s": next((e.get("load_s") for e in events if e["event"] == "loaded"), None),
           **{k: v for k, v in prepared.items() if k not in ("event", "t")}}
    for kind in ("engine", "encode"):
        row |= {k: v for e in events if e["event"] == kind for k, v in e.items() if k not in ("event", "t")}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sdxl")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--device", default="auto")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--backend", choices=("jit", "aot"), default="jit", help="local.compile_backend")
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help="time the engine and encoders in the artifacts case")
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--t0", help=argparse.SUPPRESS)
    p.add_argument("--artifacts", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cold_start-"))
    rows = []
    for case in args.cases.split(","):
        print(f"case {case} ...", flush=True)
        rows.append(_summary(case, _run_case(case, args, root)))
        if args.out:
            Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"\n$ python {' '.join(sys.argv)}")
    print(f"{'case':14} {'first shape':>12} {'all shapes':>11}   detail")
    for row in rows:
        detail = {k: v for k, v in row.items() if k not in ("case", "first_shape_s", "all_shapes_s")}
        print(f"{row['case']:14} {row['first_shape_s']!s:>11}s {row['all_shapes_s']!s:>10}s   {detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
