"""Local pool on a GPU: the card's matmul ceiling, a naive diffusers loop, and our compiled engine
at several batch sizes (bf16, optionally FP8), side by side in one run.

Run on the GPU machine (one model per run keeps each run inside 10 minutes):
    python benchmarks/local_pool.py --model sd15 --batches 1,8,32 --naive 4 --out sd15.json
    python benchmarks/local_pool.py --model sdxl --batches 1,2,4,8 --naive 3 --fp8-batches 8 --out sdxl.json
    python benchmarks/local_pool.py --report sd15.json sdxl.json      # the combined table (markdown)
Every run also works on a CPU with --model tiny (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPU_HOUR_USD = 2.00
MODELS = {  # size, steps (with classifier-free guidance)
    "sdxl": (1024, 30),
    "sd15": (512, 30),
    "tiny": (256, 4),
}


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_ceiling() -> float:
    """Sustained bf16 TFLOP/s of an 8192^3 product on random data (median of 20, after warm-up)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times) / 1e12


def unet_inputs(pipe, batch: int, size: int):
    """Random UNet inputs of the pipeline's real shapes (CFG doubles the batch)."""
    import torch

    dev, dtype = pipe.unet.device, pipe.unet.dtype
    latent = size // pipe.vae_scale_factor
    x = torch.randn(2 * batch, 4, latent, latent, device=dev, dtype=dtype)
    hidden = pipe.unet.config.cross_attention_dim
    kwargs = {"encoder_hidden_states": torch.randn(2 * batch, 77, hidden, device=dev, dtype=dtype)}
    if pipe.unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * batch, 1280, device=dev, dtype=dtype),
                                       "time_ids": torch.randn(2 * batch, 6, device=dev, dtype=dtype)}
    return x, torch.tensor(500, device=dev), kwargs


def count_flops(pipe, size: int) -> tuple[float, float]:
    """(UNet TFLOP per image per forward, VAE decode TFLOP per image), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, t, kw = unet_inputs(pipe, 1, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as unet_counter:
        pipe.unet(x, t, **kw)
    z = torch.randn(1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor,
                    device=x.device, dtype=x.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as vae_counter:
        pipe.vae.decode(z)
    return unet_counter.get_total_flops() / 2 / 1e12, vae_counter.get_total_flops() / 1e12


def unet_error(pipe, reference_unet, size: int) -> float:
    """Relative error of this pipeline's UNet output against the eager bf16 reference, fresh random inputs."""
    import torch

    from backends.local.optimize import relative_error

    x, t, kw = unet_inputs(pipe, 1, size)
    with torch.inference_mode():
        return relative_error(pipe.unet(x, t, **kw)[0], reference_unet(x, t, **kw)[0])


def time_batches(engine, batch: int, size: int, steps: int, repeats: int) -> dict:
    """Compile/warm-up time, then the median batch latency over `repeats` runs."""
    import torch

    prompts = [f"a photograph of subject {i}" for i in range(batch)]
    started = time.perf_counter()
    engine.generate(prompts, width=size, height=size, steps=steps, seeds=list(range(batch)))
    sync()
    warm_s = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for r in range(repeats):
        started = time.perf_counter()
        engine.generate(prompts, width=size, height=size, steps=steps, seeds=[r * 1000 + i for i in range(batch)])
        sync()
        runs.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"batch": batch, "latency_s": statistics.median(runs), "runs": runs, "warm_s": warm_s,
            "peak_gib": peak}


def naive_loop(engine, images: int, size: int, steps: int) -> dict:
    """Eager diffusers, one image at a time (after one untimed warm-up image)."""
    engine.generate(["warm-up"], width=size, height=size, steps=steps, seeds=[0])
    sync()
    runs = []
    for i in range(images):
        started = time.perf_counter()
        engine.generate([f"a photograph of subject {i}"], width=size, height=size, steps=steps, seeds=[i])
        sync()
        runs.append(time.perf_counter() - started)
    return {"batch": 1, "latency_s": statistics.median(runs), "runs": runs, "warm_s": 0.0, "peak_gib": float("nan")}


def derive(row: dict, flops_per_image: float, unet_tflop: float, steps: int, ceiling: float) -> dict:
    b, lat = row["batch"], row["latency_s"]
    per_image = lat / b
    unet_total = unet_tflop * 2 * steps * b  # CFG: two UNet passes per step
    return {**row, "images_per_s": b / lat, "gpu_s_per_image": per_image,
            "unet_tflops": unet_total / lat, "tflops": flops_per_image * b / lat,
            "mfu": flops_per_image * b / lat / ceiling if ceiling == ceiling else float("nan"),
            "cost_per_image_usd": GPU_HOUR_USD / 3600 * per_image}


def _save(args, out: dict) -> None:
    if args.out:  # after every row: a run cut short still leaves its numbers
        Path(args.out).write_text(json.dumps(out, indent=1))


def run(args) -> dict:
    import torch

    from backends.local.engine import DiffusionEngine, EngineSpec

    began = time.perf_counter()
    size, steps = MODELS[args.model]
    steps = args.steps or steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out = {"model": args.model, "size": size, "steps": steps, "card": card, "torch": torch.__version__,
           "command": " ".join(sys.argv), "rows": []}
    out["ceiling_tflops"] = ceiling = matmul_ceiling()
    print(f"[{card}] bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)

    naive = DiffusionEngine(EngineSpec(preset=args.model, device=device, compile=False, tune_layout=False))
    naive.load()
    unet_tflop, vae_tflop = count_flops(naive.pipe, size)
    per_image = unet_tflop * 2 * steps + vae_tflop
    out.update(unet_tflop_per_forward=unet_tflop, vae_tflop=vae_tflop, tflop_per_image=per_image)
    print(f"counted: UNet {unet_tflop:.3f} TFLOP/forward/image, VAE decode {vae_tflop:.2f}, "
          f"{per_image:.1f} TFLOP/image", flush=True)
    if args.naive:
        row = derive(naive_loop(naive, args.naive, size, steps), per_image, unet_tflop, steps, ceiling)
        out["rows"].append({"variant": "naive eager bf16", **row})
        _save(args, out)
        print(f"naive: {row['latency_s']:.3f} s/image", flush=True)
    reference_unet = copy.deepcopy(naive.pipe.unet) if args.fp8_batches and not args.skip_error else naive.pipe.unet
    variants = [("ours bf16 compiled", False, args.batches)]
    if args.fp8_batches:
        variants.append(("ours fp8 compiled", True, args.fp8_batches))
    del naive
    for name, fp8, batches in variants:
        if not batches or time.perf_counter() - began > args.budget_s:
            continue
        engine = DiffusionEngine(EngineSpec(preset=args.model, device=device, fp8=fp8,
                                            compile=None if device == "cuda" else False))
        started = time.perf_counter()
        engine.load()
        load_s = time.perf_counter() - started
        err = float("nan") if args.skip_error else unet_error(engine.pipe, reference_unet, size)
        print(f"{name}: loaded in {load_s:.0f}s; UNet relative error vs eager bf16 {err:.2e}", flush=True)
        for b in batches:
            if time.perf_counter() - began > args.budget_s:
                print(f"  batch {b}: skipped, past the {args.budget_s:.0f}s budget", flush=True)
                continue
            row = derive(time_batches(engine, b, size, steps, args.repeats), per_image, unet_tflop, steps, ceiling)
            out["rows"].append({"variant": name, "unet_rel_error": err, **row})
            _save(args, out)
            print(f"  batch {b}: {row['latency_s']:.3f} s/batch, {row['gpu_s_per_image']:.3f} GPU-s/image, "
                  f"compile+warm {row['warm_s']:.0f}s, peak {row['peak_gib']:.1f} GiB", flush=True)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def table(results: list[dict]) -> str:
    lines = []
    for res in results:
        naive = next((r for r in res["rows"] if r["variant"].startswith("naive")), None)
        lines.append(f"\n### {res['model']} {res['size']}x{res['size']}, {res['steps']} steps, CFG — {res['card']}, "
                     f"torch {res['torch']}; matmul ceiling {res['ceiling_tflops']:.0f} TFLOP/s; "
                     f"{res['tflop_per_image']:.1f} TFLOP/image (UNet {res['unet_tflop_per_forward']:.2f}/forward, "
                     f"VAE {res['vae_tflop']:.2f})\n")
        lines.append("| variant | batch | batch latency s | images/s | GPU-s/image | x naive | UNet TFLOP/s | MFU "
                     "| peak GiB | compile+warm s | $/image @ $2/h | UNet rel. err |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            speedup = r["images_per_s"] / naive["images_per_s"] if naive else float("nan")
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['latency_s']:.3f} | {r['images_per_s']:.2f} "
                f"| {r['gpu_s_per_image']:.3f} | {speedup:.2f} | {r['unet_tflops']:.0f} | {r['mfu']:.0%} "
                f"| {r['peak_gib']:.1f} | {r['warm_s']:.0f} | {r['cost_per_image_usd']:.5f} "
                f"| {r.get('unet_rel_error', float('nan')):.1e} |")
        lines.append(f"\ncommand: `{res['command']}`")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--fp8-batches", default="")
    p.add_argument("--naive", type=int, default=3, help="images for the naive loop (0 skips it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    p.add_argument("--skip-error", action="store_true", help="skip the UNet relative-error check (saves a compile)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    p.add_argument("--report", nargs="*", help="print the combined table of earlier --out files")
    args = p.parse_args()
    if args.report:
        print(table([json.loads(Path(f).read_text()) for f in args.report]))
        return
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.fp8_batches = [int(b) for b in args.fp8_batches.split(",") if b]
    result = run(args)
    _save(args, result)
    print(table([result]))


if __name__ == "__main__":
    main()
