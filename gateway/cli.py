"""`imagegw`: serve the gateway, inspect the policy, read the audit log."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from policies.traces import KINDS

from .config import ConfigError, load_policy, load_settings
from .settings import Settings

__all__ = ["main"]


def _load(args) -> tuple[Settings, object]:
    settings = load_settings(Path(args.config) if args.config else None)
    return settings, load_policy(settings)


def _banner(settings: Settings, sandbox: bool) -> str:
    base = f"http://{settings.server.host}:{settings.server.port}"
    return f"""
imagegw listening on {base}
  config:  {settings.config_dir or '(built-in defaults)'}   data: {settings.data_dir.resolve()}
  local pool: {'preset ' + settings.local.preset if settings.local.enabled else 'disabled'}
  providers: {', '.join(settings.backends) or 'none'}{'  (SANDBOX: emulated, no keys set)' if sandbox else ''}
  docs:    {base}/schema        backends: {base}/v1/backends
  console: {base}/ui/          (sign in with the admin key)

Try it:
  curl -s {base}/v1/images/generations -H 'content-type: application/json' \\
    -d '{{"prompt": "a red fox in snow", "size": "256x256"}}' -D - -o /tmp/imagegw.json
"""


class CliError(Exception):
    """A one-line error for the user (exit code 2), never a traceback."""


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror} (another gateway running? try --port)") \
                from exc


def _scrub_logs(redactor) -> None:
    """Every log line, ours and the libraries', passes through the redactor (secrets never reach logs)."""
    from .redact import ScrubbingFormatter

    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            fmt = handler.formatter
            handler.setFormatter(ScrubbingFormatter(redactor, fmt._fmt if fmt else None, fmt.datefmt if fmt else None))


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas before the threads that would each grow one (`server.malloc_arena_max`): freed
    image buffers then go back to a shared arena instead of staying resident in a thread's own. False where the
    C library has no mallopt (not glibc) or refuses, and for 0 (glibc's default left as it is)."""
    if arenas <= 0:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_ARENA_MAX, arenas) == 1


_M_ARENA_MAX = -8  # glibc's malloc.h


def cmd_serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .registry import sandbox_active

    settings, policy = _load(args)
    if args.host:
        settings.server.host = args.host
    if args.port is not None:
        settings.server.port = args.port
    _check_port_free(settings.server.host, settings.server.port)  # before the banner and a new admin key
    limit_malloc_arenas(settings.server.malloc_arena_max)
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per provider call is noise
    app = create_app(settings, policy)
    _scrub_logs(app.state.redactor)
    print(_banner(settings, sandbox_active(settings)), flush=True)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level=settings.server.log_level, access_log=False,
                timeout_graceful_shutdown=settings.server.drain_timeout_s,
                loop=settings.server.loop, http=settings.server.http)
    _exit_past_lingering_threads()
    return 0


def cmd_worker(args) -> int:
    """The pool's workers on this host (one per GPU), serving every gateway through Redis Streams."""
    import asyncio
    import contextlib
    import signal

    import redis.asyncio as redis

    from backends.local.stream import FleetKeys, StreamConsumer

    from .registry import build_local_pool

    settings, _ = _load(args)
    if not settings.redis_url:
        raise CliError("imagegw worker needs redis_url (or IMAGEGW_REDIS_URL): the gateways send batches through it")
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.local.workers = "auto" if settings.local.workers == "remote" else settings.local.workers  # real ones
    workers = build_local_pool(settings).workers

    async def main() -> None:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
        keys = FleetKeys(settings.redis_namespace)
        consumers = [StreamConsumer(client, keys, w, worker_id=f"{args.id}-{i}" if args.id else None,
                                    reclaim_s=settings.local.remote_reclaim_s) for i, w in enumerate(workers)]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # finish the batch in hand, then leave
            loop.add_signal_handler(sig, lambda: [c.stop() for c in consumers])
        print(f"imagegw worker: {len(consumers)} worker(s) ({', '.join(c.id for c in consumers)}) on "
              f"namespace {settings.redis_namespace}", flush=True)
        try:
            await asyncio.gather(*(c.run() for c in consumers))
        finally:
            for w in workers:
                with contextlib.suppress(Exception):
                    await w.stop()
            await client.aclose()

    asyncio.run(main())
    _exit_past_lingering_threads()
    return 0


def _exit_past_lingering_threads() -> None:
    """The app has shut down (requests drained, audit flushed). A local-pool warm-up still compiling in a
    thread cannot be interrupted; the interpreter would wait for it at exit (minutes), so exit now."""
    import os
    import threading

    lingering = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
                 and t.is_alive()]
    if lingering:
        logging.getLogger(__name__).warning("exiting without waiting for %s", ", ".join(lingering))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_healthcheck(args) -> int:
    """Exit 0 when /readyz on the configured port says the gateway can serve (for Docker's HEALTHCHECK)."""
    import urllib.request

    settings, _ = _load(args)
    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.server.port}/readyz", timeout=args.timeout) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"imagegw: not ready: {exc}", file=sys.stderr)
        return 1


def cmd_policy_schema(args) -> int:
    from policies.schema import Policy

    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def cmd_policy_validate(args) -> int:
    from policies.lint import policy_warnings

    from .config import parse_policy

    path = Path(args.file)
    policy = parse_policy(path.read_text(), str(path))
    warnings = policy_warnings(policy)
    for warning in warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    if warnings and args.strict:
        print(f"{path}: {len(warnings)} warning(s), refused under --strict", file=sys.stderr)
        return 2
    print(f"{path}: valid (fingerprint {policy.fingerprint}, {len(policy.rules)} rules, "
          f"{len(policy.backends)} backends, {len(policy.tiers)} tiers"
          + (f", {len(warnings)} warning(s)" if warnings else "") + ")")
    return 0


def _summary(record: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
    d = record.get("decision") or {}
    err = (record.get("error") or {}).get("code", "")
    return (f"{when} {record['id'][:12]} {record['status']} {record.get('backend') or '-':<9} "
            f"{record['latency_ms']:>8.0f}ms ${record.get('cost_usd', 0):.6f} tier={d.get('tier', '-')} "
            f"sla_met={record.get('sla_met')} {err} | {d.get('reason', '')}")


def cmd_audit_tail(args) -> int:
    from .audit import open_reader

    settings, _ = _load(args)
    reader = open_reader(settings)
    print(f"reading {reader.name}", file=sys.stderr)
    seen: set[str] = set()
    while True:
        for record in reader.recent(args.n):
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            print(json.dumps(record) if args.json else _summary(record), flush=True)
        if not args.follow:
            return 0
        time.sleep(1.0)


def cmd_sandbox(args) -> int:
    import uvicorn

    from backends.sandbox import create_sandbox_app

    from .sandbox_runner import load_sandbox_config

    config = load_sandbox_config(Path(args.faults) if args.faults else None)
    print(f"imagegw SANDBOX (emulated Seedream, Gemini, Reve, Bria) on http://{args.host}:{args.port}\n"
          f"  base URLs: /seedream/api/v3  /gemini  /reve  /bria     faults: GET/PUT /_sandbox/config", flush=True)
    uvicorn.run(create_sandbox_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_pool_calibrate(args) -> int:
    from backends.local.calibrate import calibrate
    from backends.local.pool import load_profile

    from .registry import build_local_pool

    settings, _ = _load(args)
    pool = build_local_pool(settings)
    engine_spec = pool.workers[0].spec
    shapes = sorted({(w.width, w.height, w.steps) for w in pool.workers[0].warm_shapes})
    if args.shape:
        shapes = [_parse_shape(s) for s in args.shape]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else _powers(settings.local.max_batch)
    out = Path(args.out) if args.out else settings.resolve(settings.local.profile_file)
    from backends.local.engine import DiffusionEngine

    engine = DiffusionEngine(engine_spec)
    print(f"loading {pool.model} on {engine_spec.device} ...", flush=True)
    engine.load()
    total = len(shapes) * len(batches)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="shape")
        report = lambda label: (bar.set_description(label), bar.update(0))  # noqa: E731
    except ImportError:  # pragma: no cover
        bar, report = None, lambda label: print(label, flush=True)
    done = [0]

    def progress(label: str) -> None:
        if bar is not None and done[0]:
            bar.update(1)
        done[0] += 1
        report(label)

    profile = calibrate(engine, pool.model, shapes, batches, repeats=args.repeats, progress=progress,
                        profile=load_profile(out, settings.local.max_batch))
    if bar is not None:
        bar.update(1)
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile.to_json(), indent=1))
    for (model, w, h, steps), row in sorted(profile.table.items()):
        cells = "  ".join(f"b{b}: {s:.3f}s ({s / b:.3f}/img)" for b, s in sorted(row.items()))
        print(f"{model} {w}x{h} {steps} steps  {cells}")
    print(f"profile written to {out}")
    return 0


def cmd_pool_build(args) -> int:
    """Compile the warm shapes once (jit: torch.compile's cache; aot: AOTInductor packages per size) into the
    artifact folder, for this and every host like it."""
    import dataclasses
    import shutil

    from backends.local.engine import DiffusionEngine

    from .registry import build_local_pool

    settings, _ = _load(args)
    pool = build_local_pool(settings)
    out = Path(args.out).resolve() if args.out else settings.resolve(settings.local.artifacts)
    spec = dataclasses.replace(pool.workers[0].spec, compile=True, artifacts_dir=out)
    shapes = pool.workers[0].warm_shapes
    sizes = list(dict.fromkeys((w.width, w.height) for w in shapes))
    if args.size:
        sizes = [_parse_size(s) for s in args.size]
    engine = DiffusionEngine(spec)
    print(f"loading {pool.model} on {spec.device} ...", flush=True)
    engine.load()
    store = engine.store
    if spec.compile_backend == "jit":
        todo = [s for s in shapes if (s.width, s.height) in sizes]
        if args.jobs > 1 and len(_jit_build_groups(spec, todo)) > 1:
            return _build_jit_in_parallel(spec, todo, store, args.jobs)
        return _build_jit(engine, todo, store)
    if args.force:
        shutil.rmtree(store.folder, ignore_errors=True)
    print(f"building {len(sizes)} size(s), batch 1-{spec.max_batch}, into {store.folder}", flush=True)
    started = time.perf_counter()
    parallel = _build_in_parallel(spec, engine, sizes, args.jobs) if args.jobs > 1 else set()
    for i, (width, height) in enumerate(sizes, 1):
        step = time.perf_counter()
        timings = engine.prepare(width, height, lambda d, i=i: print(f"  [{i}/{len(sizes)}] {d} ...", flush=True))
        if timings.get("fallback"):
            print(f"{width}x{height}: could not be compiled ahead of time (see the log above); workers will use "
                  "torch.compile for it", file=sys.stderr)
            return 1
        built = ", ".join(f"{k.removeprefix('build_').removesuffix('_s')} {v:.1f}s" for k, v in timings.items()
                          if k.startswith("build_"))
        if not built and (width, height) in parallel:
            built = "compiled above"
        print(f"{width}x{height}: {built or 'already built'}; loads in {timings.get('load_s', 0):.1f}s "
              f"({time.perf_counter() - step:.1f}s)", flush=True)
    print(f"done in {time.perf_counter() - started:.1f}s: {store.folder}")
    print(f"copy {out} to hosts with the same GPU and software (local.artifacts); a worker that finds no match logs "
          "why and compiles")
    return 0


def _build_jit(engine, shapes, store) -> int:
    """torch.compile every warm shape once, then save what was compiled as one portable file."""
    started = time.perf_counter()
    print(f"compiling {len(shapes)} shape(s) with torch.compile into {store.folder}", flush=True)
    for i, shape in enumerate(shapes, 1):
        step = time.perf_counter()
        engine.generate(["build"] * shape.batch, width=shape.width, height=shape.height, steps=shape.steps,
                        seeds=list(range(shape.batch)))
        print(f"  [{i}/{len(shapes)}] {shape.width}x{shape.height} x{shape.batch}, {shape.steps} steps: "
              f"{time.perf_counter() - step:.1f}s", flush=True)
    written = engine.save_jit_cache()
    if not written:
        print("nothing was compiled (compile is off for this device?)", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f}s: {written / 1e6:.1f} MB in {store.folder}")
    return 0


def _jit_build_groups(spec, shapes) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(width, height, steps, batch sizes) a build process compiles: one per size under a dynamic batch (its
    batch sizes share one graph), one per shape under static graphs."""
    if not spec.dynamic_batch:
        return [(s.width, s.height, s.steps, (s.batch,)) for s in shapes]
    groups: dict[tuple[int, int, int], list[int]] = {}
    for s in shapes:
        groups.setdefault((s.width, s.height, s.steps), []).append(s.batch)
    return [(w, h, steps, tuple(batches)) for (w, h, steps), batches in groups.items()]


def _build_jit_in_parallel(spec, shapes, store, jobs: int) -> int:
    """Each size (or, under static graphs, each warm shape) compiled in its own process with its own compile
    cache, then the caches merged into the artifact folder: the compiles overlap (the GPU holds several SDXL
    pipelines)."""
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from backends.local import jit_cache
    from backends.local.parallel_build import build_jit_shapes

    started = time.perf_counter()
    groups = _jit_build_groups(spec, shapes)
    workers = min(jobs, len(groups))
    print(f"compiling {len(shapes)} shape(s) with torch.compile in {len(groups)} process(es), {workers} at a time, "
          f"into {store.folder}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="imagegw-build-") as scratch, \
            ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        caches = {i: Path(scratch) / f"build-{i}" for i in range(len(groups))}
        futures = {pool.submit(build_jit_shapes, spec, caches[i], w, h, batches, steps): i
                   for i, (w, h, steps, batches) in enumerate(groups)}
        for done, future in enumerate(as_completed(futures), 1):
            w, h, steps, batches = groups[futures[future]]
            label = f"  [{done}/{len(groups)}] {w}x{h} x{','.join(map(str, batches))}, {steps} steps"
            try:
                print(f"{label}: {future.result():.1f}s (at {time.perf_counter() - started:.0f}s)", flush=True)
            except Exception as exc:
                failed += 1
                print(f"{label}: failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        written = 0
        for cache in caches.values():  # save() merges one cache in and returns the folder's size
            written = jit_cache.save(store, cache) or written
    if failed or not written:
        print(f"{failed} build(s) failed; nothing saved for them", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f}s: {written / 1e6:.1f} MB in {store.folder}")
    return 0


def _build_in_parallel(spec, engine, sizes: list[tuple[int, int]], jobs: int) -> set[tuple[int, int]]:
    """Each missing package compiled in its own process (each loads the pipeline; the GPU has room for a few),
    so the components' compiles overlap on a host with the cores; the loop after this then only loads."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from backends.local.parallel_build import build_component

    todo = [c for w, h in sizes for c in engine.aot.components(w, h) if not engine.aot.store.has(c)]
    if len(todo) < 2:
        return set()
    print(f"  compiling {len(todo)} package(s), {min(jobs, len(todo))} at a time ...", flush=True)
    with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(build_component, spec, c): c for c in todo}
        for future in as_completed(futures):
            c = futures[future]
            try:
                seconds = future.result()
                print(f"  {c.name} {c.width}x{c.height}: compiled in {seconds:.1f}s", flush=True)
            except Exception as exc:  # the loop after this builds it in this process, or reports the failure
                print(f"  {c.name} {c.width}x{c.height}: failed in its own process ({type(exc).__name__}: {exc})",
                      flush=True)
    return {(c.width, c.height) for c in todo}


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    return width, height


def cmd_policy_simulate(args) -> int:
    from .config import parse_policy
    from .simulation import audit_records, build_world, compare, load_trace, render_html, render_text

    settings, current = _load(args)
    if args.current:
        current = parse_policy(Path(args.current).read_text(), args.current)
    candidate = parse_policy(Path(args.candidate).read_text(), args.candidate)
    records = audit_records(settings, args.since, args.until) if (args.audit or args.fit_from_audit) else None
    if args.trace:
        spec = {"file": args.trace}
    elif args.audit:
        spec = {"audit": {}}
    else:
        spec = {"synthetic": args.synthetic, "duration_s": args.duration, "rate_per_s": args.rate, "seed": args.seed}
    try:
        trace = load_trace(spec, settings, records, policy=candidate)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not trace:
        print("the trace is empty", file=sys.stderr)
        return 2
    world = build_world(settings, current, args.gpus, records)
    from tqdm import tqdm

    total = 2 * len(trace)  # the trace once under each policy
    with tqdm(total=total, unit="req", desc="simulating (current, then candidate)") as bar:
        def progress(fraction):
            bar.update(max(0, int(fraction * total) - bar.n))

        a, b = compare(current, candidate, trace, world, args.seed, progress)
        bar.update(total - bar.n)
    print(render_text(a, b))
    if args.report:
        Path(args.report).write_text(render_html(a, b, f"{args.candidate} vs current policy"))
        print(f"report: {args.report}")
    return 0


def cmd_plan(args) -> int:
    from .planning import render_plan_html, render_plan_text, run_plan
    from .simulation import audit_records, load_trace

    settings, policy = _load(args)
    records = audit_records(settings, args.since, args.until) if args.audit else None
    if args.trace:
        spec = {"file": args.trace}
    elif args.audit:
        spec = {"audit": {}}
    else:
        spec = {"synthetic": args.synthetic, "duration_s": args.duration, "rate_per_s": args.rate, "seed": args.seed}
    prices = {}
    for item in args.gpu_price or ():
        name, _, usd = item.partition("=")
        try:
            prices[name] = float(usd)
        except ValueError as exc:
            raise CliError(f"--gpu-price {item!r}: NAME=USD_PER_HOUR, e.g. h100=2.0") from exc
    try:
        trace = load_trace(spec, settings, records, policy=policy)
        if not trace:
            raise CliError("the trace is empty")
        profile = None
        if args.profile:
            from policies.profile import ThroughputProfile

            try:
                profile = ThroughputProfile.from_json(json.loads(Path(args.profile).read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CliError(f"--profile {args.profile}: {exc}") from exc
        plans = run_plan(settings, policy, trace, max_gpus=args.max_gpus, gpu_prices=prices or None,
                         min_sla=args.min_sla, seed=args.seed, records=records, profile=profile,
                         progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    print(render_plan_text(plans, len(trace)))
    if args.report:
        Path(args.report).write_text(render_plan_html(plans, len(trace), "imagegw plan: self-host or buy"))
        print(f"report: {args.report}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int]:
    size, _, steps = text.partition(":")
    w, h = size.lower().split("x")
    return int(w), int(h), int(steps or 30)


def _powers(limit: int) -> list[int]:
    out, b = [], 1
    while b <= limit:
        out.append(b)
        b *= 2
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagegw", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="folder with gateway.yaml and policy.yaml (default: ./config)")
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the pool's GPU workers for the gateways (through Redis)")
    worker.add_argument("--config", help="config folder (default: ./config)")
    worker.add_argument("--id", help="worker id prefix (default: host-pid-device)")
    worker.set_defaults(func=cmd_worker)
    health = sub.add_parser("healthcheck", help="exit 0 if the running gateway is ready (/readyz)")
    health.add_argument("--config", help="config folder (default: ./config); its server.port is asked")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (3)")
    health.set_defaults(func=cmd_healthcheck)

    sandbox = sub.add_parser("sandbox", help="serve the four providers' emulators")
    sandbox.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sandbox.add_argument("--port", type=int, default=8090, help="port to listen on (8090)")
    sandbox.add_argument("--faults", help="YAML with latency and fault rates per provider")
    sandbox.set_defaults(func=cmd_sandbox)

    pool = sub.add_parser("pool", help="local GPU pool tools").add_subparsers(dest="pool_cmd", required=True)
    calib = pool.add_parser("calibrate", help="measure seconds per batch into the throughput profile")
    calib.add_argument("--config", help="config folder (default: ./config)")
    calib.add_argument("--shape", action="append", help="WxH:steps (repeatable); default: local.warm_shapes")
    calib.add_argument("--batches", help="comma-separated batch sizes; default: powers of two to max_batch")
    calib.add_argument("--repeats", type=int, default=2, help="timed runs per shape and batch size (default 2)")
    calib.add_argument("--out", help="profile file; default: data_dir/local.profile_file")
    calib.set_defaults(func=cmd_pool_calibrate)
    build = pool.add_parser("build", help="compile the configured sizes ahead of time into local.artifacts")
    build.add_argument("--config", help="config folder (default: ./config)")
    build.add_argument("--size", action="append", help="WxH (repeatable); default: the sizes in local.warm_shapes")
    build.add_argument("--out", help="artifact folder; default: data_dir/local.artifacts")
    build.add_argument("--force", action="store_true", help="rebuild packages that exist already")
    build.add_argument("--jobs", type=int, default=2,
                       help="shapes (jit) or packages (aot) compiled at once, one process each (2)")
    build.set_defaults(func=cmd_pool_build)

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_cmd", required=True)
    policy.add_parser("schema", help="print the policy's JSON Schema").set_defaults(func=cmd_policy_schema)
    sim = policy.add_parser("simulate", help="replay a trace under the current and a candidate policy")
    sim.add_argument("candidate", help="the policy file to try (e.g. config/examples/candidate.yaml)")
    sim.add_argument("--config", help="config folder (default: ./config)")
    sim.add_argument("--current", help="policy to compare against (default: the configured one)")
    sim.add_argument("--trace", help="JSON-lines trace file (docs: policies/traces.py)")
    sim.add_argument("--audit", action="store_true", help="replay the audit log (with --since/--until)")
    sim.add_argument("--fit-from-audit", action="store_true", help="fit API latency and failures from the audit")
    sim.add_argument("--since", type=float, help="with --audit: from this time (Unix seconds, UTC)")
    sim.add_argument("--until", type=float, help="with --audit: up to this time (Unix seconds, UTC)")
    sim.add_argument("--synthetic", default="diurnal", choices=list(KINDS),
                     help="a generated trace when neither --trace nor --audit is given (default: diurnal)")
    sim.add_argument("--duration", type=float, default=3600, help="synthetic trace length in seconds (3600)")
    sim.add_argument("--rate", type=float, default=0.5, help="synthetic mean requests per second (0.5)")
    sim.add_argument("--gpus", type=int, help="GPUs in the simulated pool (default: the configured devices)")
    sim.add_argument("--seed", type=int, default=0, help="random seed of the trace and simulated latencies")
    sim.add_argument("--report", help="write an HTML report with plots")
    sim.set_defaults(func=cmd_policy_simulate)
    planner = sub.add_parser("plan", help="self-host or buy: replay a trace across pool sizes and GPU prices")
    planner.add_argument("--config", help="config folder (default: ./config)")
    planner.add_argument("--trace", help="JSON-lines trace file or audit export")
    planner.add_argument("--audit", action="store_true", help="replay the audit log (with --since/--until)")
    planner.add_argument("--since", type=float, help="with --audit: from this time (Unix seconds, UTC)")
    planner.add_argument("--until", type=float, help="with --audit: up to this time (Unix seconds, UTC)")
    planner.add_argument("--synthetic", default="diurnal", choices=list(KINDS),
                         help="a generated trace when neither --trace nor --audit is given (default: diurnal)")
    planner.add_argument("--duration", type=float, default=1800, help="synthetic trace length in seconds (1800)")
    planner.add_argument("--rate", type=float, default=1.0, help="synthetic mean requests per second (1.0)")
    planner.add_argument("--max-gpus", type=int, default=4, help="pool sizes 0..N (default 4)")
    planner.add_argument("--gpu-price", action="append", metavar="NAME=USD",
                         help="hourly GPU rate, repeatable (default: local.gpu_prices in gateway.yaml)")
    planner.add_argument("--min-sla", type=float, default=0.99, help="SLA attainment the optimum must meet (0.99)")
    planner.add_argument("--seed", type=int, default=0, help="random seed of the trace and simulated latencies")
    planner.add_argument("--profile", help="throughput profile JSON to plan with (default: the pool's own), e.g. "
                         "benchmarks/profiles/sdxl_h100.json")
    planner.add_argument("--report", help="write an HTML report with the cost-by-size plot")
    planner.set_defaults(func=cmd_plan)
    validate = policy.add_parser("validate", help="check a policy file")
    validate.add_argument("file", help="the policy (YAML)")
    validate.add_argument("--strict", action="store_true", help="warnings (unreachable rules, a tier nothing "
                          "can serve) are errors: exit 2")
    validate.set_defaults(func=cmd_policy_validate)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_cmd", required=True)
    tail = audit.add_parser("tail", help="print recent audit records")
    tail.add_argument("--config", help="config folder (default: ./config); its data_dir holds the audit log")
    tail.add_argument("-n", type=int, default=20, help="how many recent records (default 20)")
    tail.add_argument("-f", "--follow", action="store_true")
    tail.add_argument("--json", action="store_true", help="whole records as JSON lines")
    tail.set_defaults(func=cmd_audit_tail)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"imagegw: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"imagegw: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
