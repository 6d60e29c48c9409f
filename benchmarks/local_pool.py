"""Local pool on a GPU: the card's matmul ceiling, a naive diffusers loop, and our compiled engine
at several batch sizes (bf16, optionally FP8), side by side in one run.

Run on the GPU machine (one model per run keeps each run inside 10 minutes):
    python benchmarks/local_pool.py --model sd15 --batches 1,8,32 --naive 4 --out sd15.json
    python benchmarks/local_pool.py --model sdxl --batches 1,2,4,8 --naive 3 --fp8-batches 8 --out sdxl.json
    python benchmarks/local_pool.py --report sd15.json sdxl.json      # the combined table (markdown)
    python benchmarks/local_pool.py --model sdxl --batches 1,8 --naive 0 --artifacts A --http   # + HTTP rows
Every run also works on a CPU with --model tiny (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
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


def capture_unet_inputs(pipe) -> dict:
    """Arms a hook that keeps the UNet's first call's inputs (the pipeline's own shapes, dtypes and
    kwargs, so calling the compiled UNet with them again needs no recompile)."""
    captured: dict = {}

    def hook(module, args, kwargs):
        if "args" not in captured:
            captured.update(args=args, kwargs=kwargs)
            captured["handle"].remove()

    captured["handle"] = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return captured


def unet_error(pipe, reference_unet, captured: dict) -> float:
    """Relative error of this pipeline's UNet output against the eager bf16 reference on the same inputs."""
    import torch

    from backends.local.optimize import relative_error

    args, kwargs = captured["args"], captured["kwargs"]
    with torch.inference_mode():
        return relative_error(pipe.unet(*args, **kwargs)[0], reference_unet(*args, **kwargs)[0])


def time_batches(engine, batch: int, size: int, steps: int, repeats: int) -> dict:
    """Compile/warm-up time, then the median batch latency over `repeats` runs, and the median
    time to the last latent (no VAE decode): the rest is decoding and turning tensors into images."""
    import torch

    prompts = [f"a photograph of subject {i}" for i in range(batch)]
    started = time.perf_counter()
    engine.generate(prompts, width=size, height=size, steps=steps, seeds=list(range(batch)))
    sync()
    warm_s = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def timed(**kw) -> list[float]:
        runs = []
        for r in range(repeats):
            started = time.perf_counter()
            engine.generate(prompts, width=size, height=size, steps=steps,
                            seeds=[r * 1000 + i for i in range(batch)], **kw)
            sync()
            runs.append(time.perf_counter() - started)
        return runs

    runs = timed(output_type="uint8")  # as the pool runs it: pixels quantised on the device, no PIL
    denoise = timed(output_type="latent")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"batch": batch, "latency_s": statistics.median(runs), "runs": runs, "warm_s": warm_s,
            "denoise_s": statistics.median(denoise), "peak_gib": peak}


def naive_loop(engine, images: int, size: int, steps: int) -> dict:
    """Plain diffusers, eager, one image at a time, PIL output (after one untimed warm-up image)."""
    import torch

    def once(i: int, output_type: str = "pil") -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            engine.pipe(prompt=[f"a photograph of subject {i}"], width=size, height=size, num_inference_steps=steps,
                        guidance_scale=engine.spec.guidance_scale, output_type=output_type,
                        generator=[torch.Generator("cpu").manual_seed(i)])
        sync()
        return time.perf_counter() - started

    once(0)
    runs = [once(i) for i in range(images)]
    denoise = [once(i, "latent") for i in range(max(1, images // 2))]
    return {"batch": 1, "latency_s": statistics.median(runs), "runs": runs, "warm_s": 0.0,
            "denoise_s": statistics.median(denoise), "peak_gib": float("nan")}


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
    reference_unet = copy.deepcopy(naive.pipe.unet) if not args.skip_error else None
    del naive
    for name, fp8, batches, overrides in _variants(args):
        if not batches or time.perf_counter() - began > args.budget_s:
            continue
        torch._dynamo.reset()  # else a variant of the same module structure reuses the last one's compiled graph
        compiled = None if device == "cuda" and not args.no_compile else False
        cache = Path(tempfile.mkdtemp(prefix="local_pool-cache-")) if args.artifacts else None  # jit: hits
        spec = EngineSpec(preset=args.model, device=device, fp8=fp8, compile=compiled,
                          compile_backend=args.backend, artifacts_dir=args.artifacts, cache_dir=cache,
                          max_batch=max(batches), **overrides)
        engine = DiffusionEngine(spec)
        started = time.perf_counter()
        engine.load()
        engine.prepare(size, size)  # AOT: load (or build) the size's packages; jit compiles at the first run
        print(f"{name}: loaded in {time.perf_counter() - started:.0f}s", flush=True)
        err = float("nan")
        for i, b in enumerate(batches):
            if time.perf_counter() - began > args.budget_s:
                print(f"  batch {b}: skipped, past the {args.budget_s:.0f}s budget", flush=True)
                continue
            captured = capture_unet_inputs(engine.pipe) if i == 0 and reference_unet is not None else None
            row = derive(time_batches(engine, b, size, steps, args.repeats), per_image, unet_tflop, steps, ceiling)
            if captured:
                err = unet_error(engine.pipe, reference_unet, captured)
            out["rows"].append({"variant": name, "unet_rel_error": err, **row})
            _save(args, out)
            print(f"  batch {b}: {row['latency_s']:.3f} s/batch (denoise {row['denoise_s']:.3f}), "
                  f"{row['gpu_s_per_image']:.3f} GPU-s/image, compile+warm {row['warm_s']:.0f}s, "
                  f"peak {row['peak_gib']:.1f} GiB, UNet rel. err {err:.1e}", flush=True)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.http:
        from http_row import http_rows

        out["rows"] += http_rows(args.model, size, steps, args.batches, args.backend, args.artifacts,
                                 args.http_clients, args.http_seconds, compiled=not args.no_compile)
        _save(args, out)
    return out


def _variants(args):
    """(name, fp8, batches, EngineSpec overrides) for each engine variant the run asked for."""
    base = {"compile_mode": args.compile_mode, "compile_vae": args.compile_vae}
    yield "ours bf16 compiled" + _suffix(args), False, args.batches, base
    yield "ours fp8 compiled" + _suffix(args), True, args.fp8_batches, base
    if args.plain_batches:  # the same compile without fused QKV and channels-last, to isolate them
        yield "bf16 compiled, no layout tuning" + _suffix(args), False, args.plain_batches, \
            {**base, "tune_layout": False}
    if args.cudnn_batches:
        yield "bf16 compiled, cuDNN attention" + _suffix(args), False, args.cudnn_batches, \
            {**base, "attention": "cudnn"}
    if args.autotune_batches:
        yield "bf16 max-autotune" + (" +VAE" if args.compile_vae else ""), False, args.autotune_batches, \
            {**base, "compile_mode": "max-autotune"}


def _suffix(args) -> str:
    parts = [args.compile_mode] if args.compile_mode != "reduce-overhead" else []
    return (" (" + ", ".join(parts + ["+VAE"] * args.compile_vae) + ")") if parts or args.compile_vae else ""


def table(results: list[dict]) -> str:
    lines = []
    for res in results:
        naive = next((r for r in res["rows"] if r["variant"].startswith("naive")), None)
        lines.append(f"\n### {res['model']} {res['size']}x{res['size']}, {res['steps']} steps, CFG — {res['card']}, "
                     f"torch {res['torch']}; matmul ceiling {res['ceiling_tflops']:.0f} TFLOP/s; "
                     f"{res['tflop_per_image']:.1f} TFLOP/image (UNet {res['unet_tflop_per_forward']:.2f}/forward, "
                     f"VAE {res['vae_tflop']:.2f})\n")
        lines.append("| variant | batch | batch latency s | images/s | GPU-s/image | x naive | UNet TFLOP/s | MFU "
                     "| peak GiB | compile+warm s | $/image @ $2/h | UNet rel. err | denoise s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        engine_rows = [r for r in res["rows"] if not r["variant"].startswith("through HTTP")]
        for r in engine_rows:
            speedup = r["images_per_s"] / naive["images_per_s"] if naive else float("nan")
            lines.append(
                f"| {r['variant']} | {r['batch']} | {r['latency_s']:.3f} | {r['images_per_s']:.2f} "
                f"| {r['gpu_s_per_image']:.3f} | {speedup:.2f} | {r['unet_tflops']:.0f} | {r['mfu']:.0%} "
                f"| {r['peak_gib']:.1f} | {r['warm_s']:.0f} | {r['cost_per_image_usd']:.5f} "
                f"| {r.get('unet_rel_error', float('nan')):.1e} | {r.get('denoise_s', float('nan')):.3f} |")
        lines += _http_table(res["rows"], engine_rows)
        lines.append(f"\ncommand: `{res['command']}`")
    return "\n".join(lines)


def _http_table(rows: list[dict], engine_rows: list[dict]) -> list[str]:
    http = [r for r in rows if r["variant"].startswith("through HTTP")]
    compiled = [r for r in engine_rows if not r["variant"].startswith("naive")]
    if not http or not compiled:
        return []
    b1 = min((r["latency_s"] for r in compiled if r["batch"] == 1), default=float("nan"))
    best = max(r["images_per_s"] for r in compiled)
    lines = ["\n| through HTTP | serve to ready s | every shape warm s | batch 1 s (engine) | + ms "
             "| clients | images/s (engine best) | share |", "|---|---|---|---|---|---|---|---|"]
    for r in http:
        lines.append(f"| {r['variant']} | {r['serve_to_ready_s']} | {r['serve_to_all_warm_s']} "
                     f"| {r['latency_s']:.3f} ({b1:.3f}) | {1000 * (r['latency_s'] - b1):+.0f} | {r['clients']} "
                     f"| {r['images_per_s']:.3f} ({best:.3f}) | {r['images_per_s'] / best:.0%} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--fp8-batches", default="")
    p.add_argument("--naive", type=int, default=3, help="images for the naive loop (0 skips it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    p.add_argument("--skip-error", action="store_true", help="skip the UNet relative-error check")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--compile-vae", action="store_true", help="compile the VAE decoder too")
    p.add_argument("--plain-batches", default="", help="also run these batches without fused QKV/channels-last")
    p.add_argument("--cudnn-batches", default="", help="also run these batches with cuDNN attention")
    p.add_argument("--autotune-batches", default="", help="also run these batches compiled with max-autotune")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    p.add_argument("--report", nargs="*", help="print the combined table of earlier --out files")
    p.add_argument("--backend", choices=("aot", "jit"), default="aot", help="compile backend (local.compile_backend)")
    p.add_argument("--artifacts", type=Path, help="AOT package folder (built there when missing)")
    p.add_argument("--http", action="store_true", help="then the same engine behind `imagegw serve`, through HTTP")
    p.add_argument("--no-compile", action="store_true", help="eager engine (and gateway): no compile at all")
    p.add_argument("--http-clients", type=int, default=8)
    p.add_argument("--http-seconds", type=float, default=60)
    args = p.parse_args()
    if args.report:
        print(table([json.loads(Path(f).read_text()) for f in args.report]))
        return
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.artifacts is None:
        args.artifacts = Path(tempfile.gettempdir()) / "imagegw-artifacts"
    for name in ("fp8_batches", "plain_batches", "cudnn_batches", "autotune_batches"):
        setattr(args, name, [int(b) for b in getattr(args, name).split(",") if b])
    result = run(args)
    _save(args, result)
    print(table([result]))


if __name__ == "__main__":
    main()
