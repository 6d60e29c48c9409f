"""SDXL's pool time at every size and step count the issue-18 traces use, measured on a GPU.

    python benchmarks/shape_profile_gpu.py --mode eager --out DIR       # every size, no compile (minutes)
    python benchmarks/shape_profile_gpu.py --mode compiled --sizes 1024x1024,1536x1024 --out DIR
    python benchmarks/shape_profile_gpu.py --combine DIR/eager.jsonl DIR/compiled.jsonl \
        --profile benchmarks/profiles/sdxl_h100.json                     # the profile the benchmarks replay
    python benchmarks/shape_profile_gpu.py --preset tiny --device cpu --sizes 64x64,96x64 --steps 2,3 \
        --batches 1,2 --base 64x64 --out /tmp/sp                         # a smoke test of the script on a CPU

The routing benchmarks replay a pool whose time for a size or step count it never measured is scaled from
1024x1024 at 30 steps in proportion to pixels and steps. Attention's cost grows with the square of the tokens,
so larger images may take more than their share. This measures each (size, steps, batch) as the pool runs it
(`engine.generate` to uint8 on the device, CFG, bf16), after one warm-up, the median of `--repeats`, and
writes a JSON line per measurement as it goes (a run cut off keeps what it measured).

`--combine` makes profile entries: a size measured compiled keeps its compiled times; a size whose transpose was
measured compiled takes those (the same pixels and tokens: 1024x1536 and 1536x1024 ran within 0.1% of each other
eager at batch 8); any other size gets the compiled 1024x1024 time at the same steps and batch times its eager
ratio to 1024x1024 (compiling every size costs ~2.5 min each). It prints the measured ratios against the linear
scaling they replace.

Measured on an H100 (2026-12-08, issue 18 session 14; benchmarks/results/h100_2026-12-08/): every size eager,
and 1024x1024, 1536x1024 and 896x1152 compiled; `benchmarks/profiles/sdxl_h100.json` holds the combined entries.
Eager batch-1 times are launch-bound and noisy (up to +40% run to run); the compiled ones are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = "1024x1024,896x1152,1152x896,1536x1024,1024x1536"  # policies.traces.SHAPES and MIXED_SHAPES


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",") if size]


def measure(args) -> None:
    import torch

    from backends.local.engine import DiffusionEngine, EngineSpec

    batches = [int(b) for b in args.batches.split(",")]
    compiled = args.mode == "compiled"
    spec = EngineSpec(preset=args.preset, device=args.device, compile=compiled,
                      run_sizes=tuple(batches) if compiled else (), max_batch=max(batches))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = (out / f"{args.mode}.jsonl").open("a")
    began = time.perf_counter()
    engine = DiffusionEngine(spec)
    engine.load()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    print(f"[{args.mode}] loaded in {time.perf_counter() - began:.1f} s; {gpu}", flush=True)
    for width, height in _sizes(args.sizes):
        started = time.perf_counter()
        engine.prepare(width, height)
        steps_list = [int(s) for s in args.steps.split(",")]
        first_steps = steps_list[0]
        for steps in steps_list:
            for batch in batches:
                def run(width=width, height=height, steps=steps, batch=batch):
                    sync()
                    t0 = time.perf_counter()
                    engine.generate(["a lighthouse at dusk"] * batch, width=width, height=height, steps=steps,
                                    seeds=list(range(batch)), output_type="uint8")
                    sync()
                    return time.perf_counter() - t0

                # compiled: a compile (first size) or a CUDA-graph capture per batch size; eager: the first run of
                # a size warms the allocator and cuDNN's choices, and others of that size need no warm-up
                fresh = compiled or (steps, batch) == (first_steps, batches[0])
                first = run() if fresh else 0.0
                seconds = statistics.median(run() for _ in range(args.repeats))
                row = {"mode": args.mode, "width": width, "height": height, "steps": steps, "batch": batch,
                       "seconds": round(seconds, 4), "first_s": round(first, 2),
                       "gpu": gpu}
                lines.write(json.dumps(row) + "\n")
                lines.flush()
                print(f"[{args.mode}] {width}x{height} {steps} steps batch {batch}: {seconds:.3f} s "
                      f"({seconds / batch:.3f} s/image; first {first:.1f} s)", flush=True)
        print(f"[{args.mode}] {width}x{height} done in {time.perf_counter() - started:.0f} s", flush=True)


def combine(args) -> None:
    rows = [json.loads(line) for path in args.combine for line in Path(path).read_text().splitlines() if line]
    table = {(r["mode"], r["width"], r["height"], r["steps"], r["batch"]): r["seconds"] for r in rows}
    base = _sizes(args.base)[0]
    compiled_sizes = {(w, h) for mode, w, h, _, _ in table if mode == "compiled"}
    entries, report = [], []
    for (mode, width, height, steps, batch), seconds in sorted(table.items()):
        if mode != "eager":
            continue
        base_eager = table.get(("eager", *base, steps, batch))
        base_compiled = table.get(("compiled", *base, steps, batch))
        linear = width * height / (base[0] * base[1])
        ratio = seconds / base_eager if base_eager else None
        if (width, height) in compiled_sizes:
            value, source = table.get(("compiled", width, height, steps, batch)), "compiled"
        elif (height, width) in compiled_sizes:  # the same pixels and tokens, turned: eager agrees within 1%
            value, source = table.get(("compiled", height, width, steps, batch)), f"compiled {height}x{width}"
        elif base_compiled and ratio:
            value, source = base_compiled * ratio, f"compiled {args.base} x eager ratio"
        else:
            continue
        if value is None:
            continue
        compiled_ratio = (table.get(("compiled", width, height, steps, batch), 0) / base_compiled
                          if base_compiled and (width, height) in compiled_sizes else None)
        entries.append({"model": args.model, "width": width, "height": height, "steps": steps, "batch": batch,
                        "seconds": round(value, 4)})
        report.append((width, height, steps, batch, seconds, ratio, linear, compiled_ratio, value, source))
    print(f"| size | steps | batch | eager s | eager vs {args.base} | linear scaling | compiled vs {args.base} | "
          "profile s | from |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w, h, steps, batch, eager, ratio, linear, cratio, value, source in report:
        print(f"| {w}x{h} | {steps} | {batch} | {eager:.3f} | {ratio:.3f} | {linear:.3f} | "
              f"{'' if cratio is None else f'{cratio:.3f}'} | {value:.3f} | {source} |")
    if args.profile:
        path = Path(args.profile)
        profile = json.loads(path.read_text())
        profile["entries"] = entries
        path.write_text(json.dumps(profile, indent=1) + "\n")
        print(f"wrote {len(entries)} entries to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sdxl", help="with --combine: the model the profile entries name")
    parser.add_argument("--base", default="1024x1024", help="the size others are scaled from")
    parser.add_argument("--sizes", default=SIZES)
    parser.add_argument("--steps", default="20,30")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="shape_profile")
    parser.add_argument("--combine", nargs="+", help="JSON-lines files of earlier runs: print and make entries")
    parser.add_argument("--profile", help="with --combine: write the entries into this profile JSON")
    args = parser.parse_args()
    combine(args) if args.combine else measure(args)


if __name__ == "__main__":
    main()
