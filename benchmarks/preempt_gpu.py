"""What a pause costs on a GPU: a pool-only batch run inside a running batch (local.preempt), against both alone.

    python benchmarks/preempt_gpu.py --out DIR                      # SDXL, 1024x1024, compiled as the pool runs it
    python benchmarks/preempt_gpu.py --mode eager --out DIR          # the same without compiling
    python benchmarks/preempt_gpu.py --preset tiny --device cpu --size 64x64 --steps 6 --draft-steps 2 \
        --batch 2 --out /tmp/pg                                      # a smoke test of the script on a CPU

The engine as a worker runs it (`engine.generate` to uint8 on the device, CFG): a flexible batch (`--batch`
images, `--steps`) alone; a pool-only draft (1 image, `--draft-steps`) alone; then the flexible batch with the
draft run between two of its steps (at `--at` of its steps, through `between_steps` and a nested call on the
sibling pipeline, as ThreadWorker.run_paused does). It reports each time, the draft's latency from the moment it
was handed over (the rest of the current step, then its own run), how much longer the paused batch took than
alone plus the draft, the peak device memory of each, and whether both outputs equal their plain runs. A JSON
line per figure goes to DIR/preempt.jsonl as it is measured.

Measured (2026-12-08) on an H100 with SDXL compiled (docs/benchmarks.md, issue 18 session 14): 1.4 ms and
+0.04 GiB over both runs alone, both outputs bit-identical. Also run on the CPU with the tiny preset, eager and
under torch.compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", choices=("compiled", "eager"), default="compiled")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--draft-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--at", type=float, default=0.3, help="share of the batch's steps done when the draft comes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from backends.local.engine import DiffusionEngine, EngineSpec

    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    width, height = (int(v) for v in args.size.split("x"))
    compiled = args.mode == "compiled"
    spec = EngineSpec(preset=args.preset, device=args.device, compile=compiled,
                      run_sizes=tuple(sorted({1, args.batch})) if compiled else (), max_batch=args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = (out / "preempt.jsonl").open("a")

    def emit(**fields) -> None:
        fields |= {"preset": args.preset, "mode": args.mode, "size": args.size, "batch": args.batch,
                   "steps": args.steps, "draft_steps": args.draft_steps}
        lines.write(json.dumps(fields) + "\n")
        lines.flush()
        print(json.dumps(fields), flush=True)

    began = time.perf_counter()
    engine = DiffusionEngine(spec)
    engine.load()
    engine.prepare(width, height)
    emit(figure="loaded", seconds=round(time.perf_counter() - began, 2),
         gpu=torch.cuda.get_device_name() if cuda else "cpu")
    batch_prompts, batch_seeds = ["a lighthouse at dusk"] * args.batch, list(range(args.batch))

    def flexible(**kw):
        return engine.generate(batch_prompts, width=width, height=height, steps=args.steps, seeds=batch_seeds,
                               output_type="uint8", **kw)

    def draft(nested: bool = False):
        return engine.generate(["a red fox"], width=width, height=height, steps=args.draft_steps, seeds=[7],
                               output_type="uint8", nested=nested)

    def timed(fn):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        return result, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

    for name, fn in (("flexible", flexible), ("draft", draft)):  # compiles or captures each shape once
        _, first, _ = timed(fn)
        emit(figure=f"{name}_first_run", seconds=round(first, 3))
    plain_batch, batch_s, batch_gib = min((timed(flexible) for _ in range(args.repeats)), key=lambda r: r[1])
    plain_draft, draft_s, draft_gib = min((timed(draft) for _ in range(args.repeats)), key=lambda r: r[1])
    emit(figure="alone", flexible_s=round(batch_s, 4), draft_s=round(draft_s, 4),
         flexible_peak_gib=batch_gib, draft_peak_gib=draft_gib)

    at_step = max(1, round(args.at * args.steps))
    rows = []
    for _ in range(args.repeats):
        state = {"step": 0}

        def between_steps(state=state) -> None:
            state["step"] += 1
            if state["step"] == at_step:
                sync()
                handed = time.perf_counter()
                state["draft"] = draft(nested=True)
                sync()
                state["draft_s"] = time.perf_counter() - handed

        paused_batch, total_s, peak = timed(lambda pause=between_steps: flexible(between_steps=pause))
        rows.append((total_s, state["draft_s"], peak, paused_batch, state["draft"]))
    total_s, nested_s, peak, paused_batch, nested_draft = min(rows, key=lambda r: r[0])
    emit(figure="paused", total_s=round(total_s, 4), draft_inside_s=round(nested_s, 4),
         overhead_s=round(total_s - batch_s - draft_s, 4), peak_gib=peak, at_step=at_step,
         median_total_s=round(statistics.median(r[0] for r in rows), 4),
         batch_equal=bool(torch.equal(paused_batch.cpu(), plain_batch.cpu())),
         draft_equal=bool(torch.equal(nested_draft.cpu(), plain_draft.cpu())))
    print(f"\ncommand: python benchmarks/preempt_gpu.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
